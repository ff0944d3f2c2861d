"""Ray Serve request routers for the engine replicas: prefix-aware (``routing.py``'s policy) and round-robin.

A router lives in the process that holds the deployment handle (the ingress), one per handle.  Ray Serve calls
``choose_replicas`` with the candidates and the pending request; it takes the first replica of the first rank
that accepts (queue below ``max_ongoing_requests``), else tries the next rank, else backs off and asks again.
"""

from __future__ import annotations

import importlib
import itertools
import logging
from collections import Counter

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from .job import Job, routing_keys
from .routing import Load, PrefixTable, RouterOptions, choose

log = logging.getLogger("ray.serve")

_DECISIONS: Counter = Counter()  # (router, reason, replica unique id) -> requests, in the ingress process


# Serve pickles the router and the ingress classes by value, with copies of the globals they name: the count is
# looked up in the imported module at each call, so router and ingress share one.
def count_decision(router: str, reason: str, replica: str) -> None:
    importlib.import_module(__name__)._DECISIONS[router, reason, replica] += 1


def decisions() -> dict:
    return dict(importlib.import_module(__name__)._DECISIONS)


def _job(pending: PendingRequest | None) -> Job | None:
    if pending is None:
        return None
    return next((a for a in pending.args if isinstance(a, Job)), None)


class PrefixAwareRouter(RequestRouter):
    """Longest past prefix match when load is balanced, else the least-loaded replica."""

    def initialize_state(self, block_size: int = 16, **options) -> None:
        self.block_size = block_size
        self.options = RouterOptions(**options)
        self.table = PrefixTable(self.options.max_keys, self.options.ttl_s)
        # internal request id -> (its routing keys, why it went where it went), until it is routed
        self.pending: dict[str, tuple[list[bytes], str]] = {}

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        job = _job(pending_request)
        if not candidate_replicas:
            return []
        loads = await self._loads(candidate_replicas)
        rid = pending_request.metadata.internal_request_id if pending_request is not None else None
        keys = self.pending[rid][0] if rid in self.pending else \
            routing_keys(job.prompt_ids, job.salt, self.block_size) if job is not None else []
        choice = choose(keys, loads, self.table, self.options)
        by_id = {r.replica_id: r for r in candidate_replicas}
        if rid is not None:
            if len(self.pending) > 10_000:  # requests cancelled before they were routed leave theirs behind
                self.pending.clear()
            self.pending[rid] = (keys, choice.reason)
        # First rank: the choice; then the rest in the order given, so a full first choice falls through to them.
        return [[by_id[choice.ranked[0]]], [by_id[r] for r in choice.ranked[1:]]]

    async def _loads(self, replicas: list[RunningReplica]) -> list[Load]:
        lens = {r.replica_id: self._replica_queue_len_cache.get(r.replica_id) for r in replicas}
        stale = [r for r in replicas if lens[r.replica_id] is None]
        if stale:
            for r, n in await self._probe_queue_lens(stale, 0):
                lens[r.replica_id] = n
        loads = []
        for r in replicas:
            stats = r.routing_stats or {}
            n = lens[r.replica_id]
            if n is None:  # the probe timed out (a busy replica answers late): its last reported requests
                n = int(stats.get("running", 0)) + int(stats.get("waiting", 0))
            loads.append(Load(r.replica_id, n, float(stats.get("kv_usage", 0.0))))
        return loads

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        keys, reason = self.pending.pop(pending_request.metadata.internal_request_id, (None, "least_loaded"))
        if _job(pending_request) is not None and keys is not None:  # not the ingress's own calls (info)
            count_decision("prefix", reason, replica_id.unique_id)
            self.table.record(keys, replica_id)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self.table.forget(replica_id)
        log.warning("kvcache router: replica %s died; its prefixes are forgotten", replica_id.unique_id)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        before = set(self._replica_id_set)
        super().update_replicas(replicas)
        for gone in before - set(self._replica_id_set):
            self.table.forget(gone)


class RoundRobinRouter(RequestRouter):
    """Each request to the next replica in turn (for comparison, and to force requests across replicas)."""

    def initialize_state(self, **_) -> None:
        self.turn = itertools.count()

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        ordered = sorted(candidate_replicas, key=lambda r: r.replica_id.unique_id)
        start = next(self.turn) % len(ordered)
        ordered = ordered[start:] + ordered[:start]
        return [[ordered[0]], ordered[1:]]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        if _job(pending_request) is not None:
            count_decision("round-robin", "turn", replica_id.unique_id)


ROUTERS = {  # import paths: Serve imports the class in the ingress, so it shares this module (and its counts)
    "prefix": "kvcache.distributed.router:PrefixAwareRouter",
    "round-robin": "kvcache.distributed.router:RoundRobinRouter",
    "pow2": "ray.serve._private.request_router:PowerOfTwoChoicesRequestRouter",  # Ray Serve's default
}
