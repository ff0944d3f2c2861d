"""The router's keys: the KV tiers' SHA-256 chain over whole blocks, rooted in the salt."""

from __future__ import annotations

import hashlib

from kvcache.distributed.job import routing_keys
from kvcache.tiers.keys import next_key


def test_keys_are_the_tier_chain_over_whole_blocks():
    ids = list(range(40))
    keys = routing_keys(ids, None, 16)
    root = hashlib.sha256(b"kvcache-router|\x00").digest()
    assert keys == [next_key(root, ids[:16]), next_key(next_key(root, ids[:16]), ids[16:32])]  # 8 left over


def test_a_shared_prefix_shares_keys_and_a_salt_separates_them():
    a, b = list(range(64)), list(range(48)) + [999] * 16
    assert routing_keys(a, None, 16)[:3] == routing_keys(b, None, 16)[:3]
    assert routing_keys(a, None, 16)[3] != routing_keys(b, None, 16)[3]
    assert not set(routing_keys(a, "alice", 16)) & set(routing_keys(a, None, 16))
    assert routing_keys(a, None, 16, limit=2) == routing_keys(a, None, 16)[:2]

