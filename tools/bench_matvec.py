"""The float decode matmul (model/matvec.py) against oneDNN, fp32 weights, 1-16 rows, for SmolLM2-135M's shapes:
microseconds per product, weights streamed from 200 MB of copies, 2 threads, best of 3 (docs/benchmarks.md).
oneDNN runs both on its blocked weight copy (what a packed model's Linear uses) and on the plain weight.

    python tools/bench_matvec.py
"""

from __future__ import annotations

import time

import torch

from kvcache.model import linear, matvec

SHAPES = ((3072, 576), (576, 1536), (49152, 576))  # gate+up, down, head


def best_per_call(product, weights, rounds: int = 3) -> float:
    for w in weights:
        product(w)
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for w in weights:
            product(w)
        best = min(best, (time.perf_counter() - start) / len(weights))
    return best


def main() -> None:
    torch.set_num_threads(2)
    for n, k in SHAPES:
        plain = [torch.randn(n, k) for _ in range(max(2, 200_000_000 // (n * k * 4)))]
        blocked = [torch.ops.mkldnn._reorder_linear_weight(w, 16) for w in plain]
        for rows in (1, 2, 4, 8, 16):
            x = torch.randn(rows, k)
            ours = best_per_call(lambda w: matvec.linear(x, w, None), plain)
            packed = best_per_call(lambda w: linear._onednn_linear(x, w, None, "none", [], ""), blocked)
            unpacked = best_per_call(lambda w: linear._onednn_linear(x, w, None, "none", [], ""), plain)
            print(f"{n}x{k}, {rows} rows: kernel {ours * 1e6:.0f} us, oneDNN blocked {packed * 1e6:.0f} us "
                  f"({packed / ours:.2f}x), oneDNN plain {unpacked * 1e6:.0f} us ({unpacked / ours:.2f}x)", flush=True)


if __name__ == "__main__":
    main()
