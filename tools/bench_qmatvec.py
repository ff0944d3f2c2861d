"""Single quantized products through QuantLinear, one row, weights streamed from memory (enough copies of each
matrix to overflow the caches), 2 threads: microseconds per call and GB/s of weights (docs/benchmarks.md).

    python tools/bench_qmatvec.py
"""

from __future__ import annotations

import time

import torch

from kvcache.model.qlinear import QuantLinear
from kvcache.model.qweight import QuantWeight

SHAPES = ((49152, 576), (3072, 576), (960, 576), (576, 1536))  # SmolLM2-135M: head, gate+up, qkv, down


def main() -> None:
    torch.set_num_threads(2)
    for fmt in ("Q8_0", "Q4_0", "Q4_1"):
        for n, k in SHAPES:
            one = QuantWeight.quantize(torch.randn(n, k) * 0.05, fmt)
            copies = max(2, 160_000_000 // one.nbytes)  # well past the last-level cache
            layers = [QuantLinear(one)] + [QuantLinear(QuantWeight.quantize(torch.randn(n, k) * 0.05, fmt))
                                           for _ in range(copies - 1)]
            x = torch.randn(1, 1, k)
            with torch.no_grad():
                for layer in layers:
                    layer(x)
                reps = 3
                start = time.perf_counter()
                for _ in range(reps):
                    for layer in layers:
                        layer(x)
                per_call = (time.perf_counter() - start) / reps / len(layers)
            print(f"{fmt} {n}x{k}: {per_call * 1e6:.0f} us/call, {one.nbytes / per_call / 1e9:.1f} GB/s", flush=True)


if __name__ == "__main__":
    main()
