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
