"""Shared benchmark helpers: timing, memory bandwidth, markdown tables."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def timed(fn: Callable[..., object], *args, **kwargs) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - start, result


def copy_bandwidth(mbytes: int = 256, repeats: int = 7) -> float:
    """memcpy bandwidth in bytes copied per second (median of repeats)."""
    src = torch.ones(mbytes * (1 << 20) // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch
    times = sorted(timed(lambda: dst.copy_(src))[0] for _ in range(repeats))
    return src.nbytes / times[len(times) // 2]


def read_bandwidth(mbytes: int = 512, repeats: int = 7) -> float:
    """Bytes/s at which a large fp32 tensor streams from memory (a sum; median of repeats).

    The reference for decoding, which reads its weights and KV cache once per token and writes little.
    """
    x = torch.ones(mbytes * (1 << 20) // 4)
    times = sorted(timed(lambda: x.sum())[0] for _ in range(repeats))
    return x.nbytes / times[len(times) // 2]


def weight_bytes(model) -> int:
    """Bytes of weights one decode step reads: all matrices, in whatever format they are held; embedding tables
    only when tied to the head (a lookup reads one row)."""
    tied = model.config.tie_word_embeddings
    floats = sum(p.nbytes for name, p in model.named_parameters()  # shared (tied) tensors are listed once
                 if name != "pos_embed.weight" and (tied or name != "embed.weight"))
    held = {id(m.qweight): m.qweight.nbytes for name, m in model.named_modules()  # GGUF formats (qlinear.py)
            if hasattr(m, "qweight") and (tied or name != "embed")}
    return floats + sum(held.values())


def percentile(sorted_values: list[float], q: float) -> float:
    """The nearest-rank ``q`` quantile (0..1) of an already sorted list."""
    return sorted_values[min(len(sorted_values) - 1, round(q * (len(sorted_values) - 1)))]


def table(headers: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
