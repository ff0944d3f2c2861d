"""A decoder layer's glue for one decoding row of SmolLM2-135M's shape (hidden 576, 9 + 3 + 3 heads of 64, MLP
1536), PyTorch's ops against the compiled glue (model/glue.py): microseconds per layer, best of 5 rounds of
2,000 layers (docs/benchmarks.md).

    python tools/bench_glue.py
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from kvcache.model import glue
from kvcache.model.rope import Rope

HIDDEN, HEADS, KV_HEADS, DIM, MLP = 576, 9, 3, 64, 1536


def main(layers: int = 2000, rounds: int = 5) -> None:
    torch.set_num_threads(2)
    x, delta, w = torch.randn(1, 1, HIDDEN), torch.randn(1, 1, HIDDEN), torch.rand(HIDDEN) + 0.5
    qkv, gate_up = torch.randn(1, 1, (HEADS + 2 * KV_HEADS) * DIM), torch.randn(1, 1, 2 * MLP)
    angles = torch.rand(1, DIM // 2).repeat(1, 2)
    rope = Rope(angles.cos(), angles.sin())
    qk_width = (HEADS + KV_HEADS) * DIM

    def pytorch():
        normed = F.rms_norm(x, (HIDDEN,), w, 1e-5)
        rope.rotate_heads_last(qkv[..., :qk_width].view(1, 1, HEADS + KV_HEADS, DIM))
        h = x + delta
        normed = F.rms_norm(h, (HIDDEN,), w, 1e-5)
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up, normed, h + delta  # the last residual add: a PyTorch op in both

    def compiled():
        _, normed = glue.rmsnorm(x, w, 1e-5)
        glue.rope_in_place(qkv, HEADS + KV_HEADS, DIM, rope.cos_heads_last, rope.sin_heads_last)
        h, normed = glue.rmsnorm(x, w, 1e-5, delta)
        return glue.silu_mul(gate_up), normed, h + delta

    with torch.inference_mode():
        for name, layer in (("pytorch", pytorch), ("compiled glue", compiled)):
            best = float("inf")
            for _ in range(rounds):
                start = time.perf_counter()
                for _ in range(layers):
                    layer()
                best = min(best, (time.perf_counter() - start) / layers)
            print(f"{name}: {best * 1e6:.1f} us per layer", flush=True)


if __name__ == "__main__":
    main()
