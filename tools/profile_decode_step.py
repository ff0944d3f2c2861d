"""One-token decode step of the real model: total time, time inside every ``Linear``, and the GB/s the
linears read their weights at.  ``KVCACHE_DECODE_KERNEL=0`` for the oneDNN path (docs/benchmarks.md).

    python tools/profile_decode_step.py float32
"""

from __future__ import annotations

import sys
import time

import torch

import kvcache
from kvcache.caches.registry import make_cache
from kvcache.model import linear


def main(dtype: str = "float32", steps: int = 30) -> None:
    torch.set_num_threads(2)
    model = kvcache.load_model("smollm2-135m", dtype=dtype)
    ids = model.tokenizer.encode("def fibonacci(n):\n    " * 40)[:256]
    cache = make_cache("auto", model, capacity=512)
    token = torch.tensor([[5]])
    step = lambda: model(token, cache=cache, logits_index=slice(-1, None))  # noqa: E731
    with torch.inference_mode():
        model(torch.tensor([ids]), cache=cache, logits_index=slice(-1, None))
        for _ in range(5):
            step()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        per_step = (time.perf_counter() - start) / steps
        inside = [0.0]
        plain = linear.Linear.forward

        def timed(self, x):
            t = time.perf_counter()
            out = plain(self, x)
            inside[0] += time.perf_counter() - t
            return out

        linear.Linear.forward = linear.Linear.__call__ = timed
        try:
            for _ in range(steps):
                step()
        finally:
            linear.Linear.forward = linear.Linear.__call__ = plain
    weights = sum(m.weight.nbytes for m in model.modules() if isinstance(m, linear.Linear))
    in_linears = inside[0] / steps
    print(f"{dtype} decode kernel={'on' if linear.DECODE_KERNEL else 'off'}: step {per_step * 1e3:.1f} ms, linears "
          f"{in_linears * 1e3:.1f} ms ({weights / 1e6:.0f} MB of weights -> {weights / in_linears / 1e9:.1f} GB/s)")


if __name__ == "__main__":
    main(*sys.argv[1:2])
