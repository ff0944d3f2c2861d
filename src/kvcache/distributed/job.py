"""What the ingress sends a replica: one prompt's token ids, its sampling params and cache salt, and the chained
keys of its leading blocks that the router matches (computed once, on first use)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from ..engine.sequence import SamplingParams
from ..tiers.keys import next_key

MAX_ROUTED_BLOCKS = 512  # leading blocks hashed for routing: a longer prompt's tail rarely decides where it goes


@dataclass
class Job:
    prompt_ids: list[int]
    params: SamplingParams
    salt: str | None = None
    _keys: list[bytes] | None = field(default=None, repr=False, compare=False)

    def prefix_keys(self, block_size: int) -> list[bytes]:
        """SHA-256 keys chained block by block (the KV tiers' ``next_key``), each standing for the whole prefix up
        to its block's end.  Rooted in the salt, so salted requests never match each other's prefixes."""
        if self._keys is None:
            self._keys = routing_keys(self.prompt_ids, self.salt, block_size)
        return self._keys


def routing_keys(prompt_ids: list[int], salt: str | None, block_size: int,
                 limit: int = MAX_ROUTED_BLOCKS) -> list[bytes]:
    salt_part = b"\x00" if salt is None else b"\x01" + salt.encode("utf-8")
    parent = hashlib.sha256(b"kvcache-router|" + salt_part).digest()
    keys = []
    for i in range(min(limit, len(prompt_ids) // block_size)):
        parent = next_key(parent, prompt_ids[i * block_size:(i + 1) * block_size])
        keys.append(parent)
    return keys
