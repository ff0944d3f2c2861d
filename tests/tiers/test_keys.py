"""Chunk keys are the same in every process and differ whenever the stored bytes would."""

from __future__ import annotations

import os
import subprocess
import sys

from kvcache.caches.paged import PagedKVCache
from kvcache.caches.paged_quantized import PagedQuantizedKVCache
from kvcache.model.shapes import random_model
from kvcache.tiers.keys import chunk_keys, model_identity, pool_identity, root_key

TOKENS = list(range(1000, 1300))
SCRIPT = ("from kvcache.tiers.keys import chunk_keys, root_key;"
          "print([k.hex() for k in chunk_keys(root_key('m', 'p', 64, 'salt'), list(range(1000, 1300)), 64)])")


def test_keys_do_not_depend_on_the_process():
    here = [k.hex() for k in chunk_keys(root_key("m", "p", 64, "salt"), TOKENS, 64)]
    for seed in ("1", "2"):
        out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True,
                             env={**os.environ, "PYTHONHASHSEED": seed}).stdout
        assert eval(out) == here


def test_a_key_stands_for_its_whole_prefix():
    keys = chunk_keys(root_key("m", "p", 64, None), TOKENS, 64)
    assert len(keys) == 4  # full chunks only
    changed = chunk_keys(root_key("m", "p", 64, None), [7] + TOKENS[1:], 64)
    assert all(a != b for a, b in zip(keys, changed))  # a change in chunk 0 changes every later key
    assert chunk_keys(root_key("m", "p", 64, None), TOKENS, 64, limit=2) == keys[:2]


def test_every_identity_part_changes_the_keys():
    base = chunk_keys(root_key("m", "p", 64, None), TOKENS, 64)
    for other in (root_key("m2", "p", 64, None), root_key("m", "p2", 64, None), root_key("m", "p", 64, ""),
                  root_key("m", "p", 64, "a")):
        assert chunk_keys(other, TOKENS, 64)[0] != base[0]


def test_model_identity_sees_weights_not_only_shapes():
    a, b = random_model("tiny-llama", seed=0), random_model("tiny-llama", seed=1)
    assert model_identity(a) == model_identity(random_model("tiny-llama", seed=0))
    assert model_identity(a) != model_identity(b)
    assert model_identity(a) != model_identity(random_model("tiny-llama", seed=0).to(__import__("torch").bfloat16))


def test_pool_identity_names_the_format():
    fp32 = PagedKVCache(2, 8, 16, 2, 32)
    int8 = PagedQuantizedKVCache(2, 8, 64, 2, 32, "int8", 2)
    int4 = PagedQuantizedKVCache(2, 8, 64, 2, 32, "int4", 2)
    ids = {pool_identity(p) for p in (fp32, int8, int4, PagedKVCache(2, 8, 64, 2, 32))}
    assert len(ids) == 4
    assert pool_identity(fp32) == pool_identity(PagedKVCache(2, 99, 16, 2, 32))  # the pool's size does not matter
