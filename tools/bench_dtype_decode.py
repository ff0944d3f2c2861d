"""Single-stream decode speed of the real model in one dtype and one cache spec, for before/after comparisons
of two checkouts (run alternately with ``PYTHONPATH=<checkout>/src``; docs/benchmarks.md has the recipe).

    python tools/bench_dtype_decode.py bfloat16 int8
"""

from __future__ import annotations

import sys
import time

import torch

import kvcache
from kvcache.generation.generate import generate


def main(dtype: str, spec: str, new_tokens: int = 64, rounds: int = 3) -> None:
    torch.set_num_threads(2)
    model = kvcache.load_model("smollm2-135m", dtype=dtype)
    ids = model.tokenizer.encode("def fibonacci(n):\n    " * 40)[:512]
    generate(model, ids, 8, cache=spec, stop_token_ids=[])  # warm-up (kernel build, allocator)
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        generate(model, ids, new_tokens, cache=spec, stop_token_ids=[])
        best = min(best, time.perf_counter() - start)
    print(f"{kvcache.__file__.split('/src/')[0]} {dtype} {spec}: {new_tokens / best:.1f} tok/s "
          f"(prompt {len(ids)}, {new_tokens} new, prefill included, best of {rounds})")


if __name__ == "__main__":
    main(*sys.argv[1:3])
