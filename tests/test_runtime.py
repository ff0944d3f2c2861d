"""tune_malloc: freed activation memory is reused instead of being faulted in again."""

from __future__ import annotations

import os
import platform
import resource
import subprocess
import sys

import pytest
import torch

from kvcache.runtime import tune_malloc

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")


def minor_faults_of_a_fresh_16mb_tensor() -> int:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.ones(4 << 20)  # 16 MiB, written: every page touched
    del x
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@glibc
def test_freed_pages_are_reused_after_tuning():
    assert tune_malloc() is True and tune_malloc() is True  # idempotent
    minor_faults_of_a_fresh_16mb_tensor()  # the heap grows once
    # untuned, glibc mmaps and unmaps 16 MiB each time: 4,096 page faults per tensor
    assert minor_faults_of_a_fresh_16mb_tensor() < 512


@glibc
def test_opt_out_by_environment():
    code = "from kvcache.runtime import tune_malloc; print(tune_malloc())"
    env = {**os.environ, "KVCACHE_TUNE_MALLOC": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_sizes_are_checked_against_the_machine_before_allocating(monkeypatch):
    import pytest

    from kvcache import runtime
    from kvcache.caches.contiguous import ContiguousKVCache
    from kvcache.caches.quantized import QuantizedKVCache
    from kvcache.engine.llm import LLM

    free = runtime.available_memory()
    assert free is None or free > 0
    for make, words in [(lambda: LLM(kv_memory="4TiB"), "a KV pool of .* blocks \\('4TiB'\\) needs 4096.00 GiB"),
                        (lambda: LLM(num_blocks=10**9), "a KV pool of 1,000,000,000 blocks needs"),
                        (lambda: ContiguousKVCache(32, 32, 128, capacity=10**8), "100,000,000 positions"),
                        (lambda: QuantizedKVCache(32, 32, 128, capacity=10**9), "quantized KV cache of")]:
        monkeypatch.setattr(runtime, "available_memory", lambda: 8 << 30)
        with pytest.raises(ValueError, match=words + ".* but only 8.00 GiB of memory is available"):
            make()
    cache = ContiguousKVCache(1, 1, 4, capacity=2)
    monkeypatch.setattr(runtime, "available_memory", lambda: 100)
    import torch

    with pytest.raises(ValueError, match="growing the KV cache to 4 positions"):
        cache.update(0, torch.ones(1, 1, 3, 4), torch.ones(1, 1, 3, 4))
    assert len(cache) == 0
