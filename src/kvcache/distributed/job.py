"""What the ingress sends a replica (one prompt's token ids, its sampling params and cache salt), and the keys
the router matches for it."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from ..engine.sequence import SamplingParams
from ..tiers.keys import chunk_keys, salt_bytes

MAX_ROUTED_BLOCKS = 512  # leading blocks hashed for routing: a longer prompt's tail rarely decides where it goes


@dataclass
class Job:
    prompt_ids: list[int]
    params: SamplingParams
    salt: str | None = None


def routing_keys(prompt_ids: list[int], salt: str | None, block_size: int,
                 limit: int = MAX_ROUTED_BLOCKS) -> list[bytes]:
    """SHA-256 keys chained block by block (the KV tiers' ``chunk_keys``), each standing for the whole prefix up to
    its block's end.  Rooted in the salt, so salted requests never match each other's prefixes."""
    root = hashlib.sha256(b"kvcache-router|" + salt_bytes(salt)).digest()
    return chunk_keys(root, prompt_ids, block_size, limit)
