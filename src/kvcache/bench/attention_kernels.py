"""Micro-benchmarks behind two design choices (docs/design.md).

* Decode attention over a long GQA cache: grouped matmul vs SDPA(enable_gqa)
  vs materialising repeat_kv, as effective GB/s of KV read.
* Multi-layer cache growth: preallocated buffer vs doubling vs torch.cat per
  step (what transformers' DynamicCache does), total time to decode T tokens.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from ..caches.contiguous import ContiguousKVCache
from ..model.attention import decode_attention
from .common import table


def _best(fn, repeats: int = 20) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def bench_decode_attention(seq_lens=(1024, 4096, 16384), heads: int = 32, kv_heads: int = 8,
                           dim: int = 128) -> list[dict]:
    """One query token attending to a (1, kv_heads, seq, dim) fp32 cache (Llama-3-8B-like heads)."""
    rows = []
    for seq in seq_lens:
        q = torch.randn(1, heads, 1, dim)
        k, v = torch.randn(1, kv_heads, seq, dim), torch.randn(1, kv_heads, seq, dim)
        group = heads // kv_heads
        kernels = {
            "grouped matmul (kvcache)": lambda: decode_attention(q, k, v),
            "SDPA enable_gqa": lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True),
            "repeat_kv + SDPA": lambda: F.scaled_dot_product_attention(
                q, k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)),
        }
        with torch.inference_mode():
            for name, fn in kernels.items():
                t = _best(fn)
                rows.append({"seq": seq, "kernel": name, "ms": 1e3 * t, "gb_s": (k.nbytes + v.nbytes) / t / 1e9})
    return rows


def format_attention_table(rows: list[dict]) -> str:
    return table(["cached tokens", "kernel", "ms", "KV read GB/s"],
                 [[f"{r['seq']:,}", r["kernel"], f"{r['ms']:.2f}", f"{r['gb_s']:.1f}"] for r in rows])


def bench_cache_growth(tokens=(1024, 4096), layers: int = 12, kv_heads: int = 12, dim: int = 64) -> list[dict]:
    """Time to append T single-token K/V steps to every layer (GPT-2-small-shaped cache)."""
    rows = []
    for total in tokens:
        kv = torch.randn(1, kv_heads, 1, dim)

        def preallocated():
            cache = ContiguousKVCache(layers, kv_heads, dim, capacity=total, check_finite=False)
            for _ in range(total):
                for layer in range(layers):
                    cache.update(layer, kv, kv)

        def doubling():
            cache = ContiguousKVCache(layers, kv_heads, dim, capacity=16, check_finite=False)
            for _ in range(total):
                for layer in range(layers):
                    cache.update(layer, kv, kv)

        def concatenating():
            ks = [torch.empty(1, kv_heads, 0, dim) for _ in range(layers)]
            vs = [torch.empty(1, kv_heads, 0, dim) for _ in range(layers)]
            for _ in range(total):
                for layer in range(layers):
                    ks[layer] = torch.cat([ks[layer], kv], dim=2)
                    vs[layer] = torch.cat([vs[layer], kv], dim=2)

        for name, fn in (("preallocated (generate)", preallocated), ("doubling", doubling),
                         ("torch.cat per step", concatenating)):
            t = _best(fn, repeats=2)
            rows.append({"tokens": total, "policy": name, "s": t, "us_per_token": 1e6 * t / total})
    return rows


def format_growth_table(rows: list[dict]) -> str:
    return table(["tokens", "policy", "total (s)", "µs per token (12 layers)"],
                 [[f"{r['tokens']:,}", r["policy"], f"{r['s']:.3f}", f"{r['us_per_token']:.0f}"] for r in rows])
