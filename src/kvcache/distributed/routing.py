"""The prefix-aware routing decision, with no Ray in it: a bounded, aging table of which replica served which
prefix keys, and the choice of a replica for one request given every candidate's load.

The policy is the one SGLang's gateway and the vLLM router call ``cache_aware``: when load is balanced (no replica
has many more requests waiting beyond its batch than another), send the request where the longest part of its
prefix was served before (if that covers at least ``match_threshold`` of
its blocks); otherwise, or when load is out of balance, send it to the least-loaded replica (ties: the one
holding fewest prefixes, so new prefixes spread out).  Load is the replica's ongoing requests; a replica whose
KV pool is nearly full is passed over for prefix matches.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class RouterOptions:
    match_threshold: float = 0.1  # matched fraction of the prompt's blocks that makes a prefix match count
    # Load is out of balance when the busiest replica has more than balance_abs requests waiting beyond its batch
    # (batch_slots running) above the least busy, and more than balance_rel times as many.  Within the batch,
    # continuous batching absorbs a request at little cost; a miss recomputes a whole prefix.
    balance_abs: int = 8
    balance_rel: float = 2.0
    batch_slots: int = 256  # the engine's --max-num-seqs
    kv_usage_limit: float = 0.95  # a replica whose pool is this full is not sent prefix matches
    max_keys: int = 1 << 18  # prefix keys remembered (oldest forgotten first): ~60 MB at most
    ttl_s: float = 600.0  # a replica's claim on a prefix expires this long after it last served it

    def __post_init__(self):
        if not 0.0 <= self.match_threshold <= 1.0:
            raise ValueError(f"match_threshold must be in 0..1, got {self.match_threshold}")
        if self.balance_abs < 0 or self.balance_rel < 1.0:
            raise ValueError(f"balance_abs must be >= 0 and balance_rel >= 1, got {self.balance_abs}, "
                             f"{self.balance_rel}")
        if self.batch_slots < 0:
            raise ValueError(f"batch_slots must be >= 0, got {self.batch_slots}")
        if self.max_keys < 1 or self.ttl_s <= 0:
            raise ValueError(f"max_keys must be >= 1 and ttl_s > 0, got {self.max_keys}, {self.ttl_s}")


@dataclass(frozen=True)
class Load:
    replica: Hashable
    requests: int  # ongoing requests (running and waiting)
    kv_usage: float = 0.0  # fraction of the pool held by requests, 0..1


@dataclass(frozen=True)
class Choice:
    ranked: list  # replica ids, best first
    reason: str  # "prefix", "least_loaded" (no useful match) or "imbalanced"
    matched_blocks: int


class PrefixTable:
    """key -> {replica: [last time it served a prompt with this prefix, how many it served]}; LRU-bounded,
    entries age out.  The count makes the replica that serves a prefix most its home: a request sent elsewhere
    while load was out of balance does not split that prefix's traffic from then on."""

    def __init__(self, max_keys: int = RouterOptions.max_keys, ttl_s: float = RouterOptions.ttl_s,
                 clock=time.monotonic):
        self.max_keys, self.ttl_s, self.clock = max_keys, ttl_s, clock
        self.keys: OrderedDict[bytes, dict] = OrderedDict()
        self.sizes: dict = {}  # replica -> keys it holds

    def record(self, keys: Sequence[bytes], replica: Hashable) -> None:
        now = self.clock()
        for key in keys:
            holders = self.keys.get(key)
            if holders is None:
                holders = self.keys[key] = {}
            else:
                self.keys.move_to_end(key)
            claim = holders.get(replica)
            if claim is None:
                self.sizes[replica] = self.sizes.get(replica, 0) + 1
                holders[replica] = [now, 1]
            else:
                claim[0], claim[1] = now, claim[1] + 1
        while len(self.keys) > self.max_keys:
            _, holders = self.keys.popitem(last=False)
            for r in holders:
                self._shrink(r)

    def match(self, keys: Sequence[bytes], replicas: Sequence[Hashable]) -> dict:
        """Leading blocks of ``keys`` each replica served (within the TTL).  Keys are chained, so holding key i
        means having served blocks 0..i: walk from the longest down until every replica is placed."""
        return {r: blocks for r, (blocks, _) in self.match_counts(keys, replicas).items()}

    def match_counts(self, keys: Sequence[bytes], replicas: Sequence[Hashable]) -> dict:
        """replica -> (leading blocks served, prompts it served with that whole prefix)."""
        now, wanted, found = self.clock(), set(replicas), {}
        for i in range(len(keys) - 1, -1, -1):
            holders = self.keys.get(keys[i])
            if not holders:
                continue
            for r, (seen, count) in list(holders.items()):
                if now - seen > self.ttl_s:
                    del holders[r]
                    self._shrink(r)
                elif r in wanted and r not in found:
                    found[r] = (i + 1, count)
            if len(found) == len(wanted):
                break
        return found

    def forget(self, replica: Hashable) -> None:
        """A replica left (died, scaled down): its claims go."""
        for key in [k for k, holders in self.keys.items() if replica in holders]:
            del self.keys[key][replica]
            if not self.keys[key]:
                del self.keys[key]
        self.sizes.pop(replica, None)

    def _shrink(self, replica: Hashable) -> None:
        self.sizes[replica] = self.sizes.get(replica, 1) - 1
        if self.sizes[replica] <= 0:
            self.sizes.pop(replica)


def choose(keys: Sequence[bytes], loads: Sequence[Load], table: PrefixTable, options: RouterOptions) -> Choice:
    """The replicas to try for one request, best first, and why."""
    if not loads:
        return Choice([], "no_replica", 0)
    # Ties on requests go to the replica holding fewest prefixes (new prefixes spread out), then the emptier pool.
    by_load = sorted(loads, key=lambda x: (x.requests, table.sizes.get(x.replica, 0), x.kv_usage))
    waiting = [max(0, x.requests - options.batch_slots) for x in loads]
    low, high = min(waiting), max(waiting)
    if high - low > options.balance_abs and high > options.balance_rel * low:
        return Choice([x.replica for x in by_load], "imbalanced", 0)
    eligible = [x.replica for x in loads if x.kv_usage < options.kv_usage_limit]
    matched = table.match_counts(keys, eligible) if keys else {}
    best = max((blocks for blocks, _ in matched.values()), default=0)
    if best and best >= options.match_threshold * len(keys):
        # The longest match; among equal ones the prefix's home (served it most), then the less loaded.
        winners = sorted((x for x in by_load if matched.get(x.replica, (0, 0))[0] == best),
                         key=lambda x: -matched[x.replica][1])
        rest = [x for x in by_load if x not in winners]
        return Choice([x.replica for x in winners + rest], "prefix", best)
    return Choice([x.replica for x in by_load], "least_loaded", best)
