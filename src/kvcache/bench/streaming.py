"""``kvcache bench stream``: bounded caches over long streams, for quality and for cost.

Quality: perplexity along one stream of the ``mixed`` corpus (English and code documents, alternating)
for three ways of keeping a fixed budget of tokens: attention sinks + window (StreamingLLM, cache
positions), the window alone, and the sliding window with recompute (each position re-encodes the
budget's worth of tokens before it: exact, the reference).  Compared per bucket of the stream at the
positions the recompute baseline evaluates; a PNG shows the curves.  Run on SmolLM2-135M (32k tokens, a
1,024-token budget, 4 sinks) and on the shipped model (trained at 512 tokens: 8k tokens, a 256 budget).

Cost: decode tok/s and KV bytes at growing stream lengths, the window cache against the full cache (up
to the model's context, where the full cache must stop).

Engine: one long request through ``LLM`` with bounded attention (blocks behind the window released)
against the plain engine: peak KV bytes, blocks released, tok/s, and the same tokens as single-stream
``generate`` with the equivalent cache.
"""

from __future__ import annotations

import time

import torch

from ..caches.registry import make_cache
from ..eval_stream import evaluate_stream, recompute_baseline, stream_ids, with_curve
from ..model import hub
from ..model.loader import load_model
from .common import table


def quality(model, name: str, tokens: int, budget: int, sinks: int, stride: int, bucket: int) -> dict:
    ids = stream_ids(model, tokens)
    runs = [evaluate_stream(model, f"window:size={budget - sinks},sinks={sinks}", ids, label="sinks + window"),
            evaluate_stream(model, f"window:size={budget},sinks=0", ids, label="window only"),
            recompute_baseline(model, ids, budget, stride)]
    reference = runs[2]
    compared = [with_curve(r.at(reference.positions), bucket) for r in runs[:2]] + [with_curve(reference, bucket)]
    ratios = {r.label: [a / b for (_, a), (_, b) in zip(r.curve, reference.curve)] for r in compared[:2]}
    return {"model": name, "tokens": tokens, "budget": budget, "sinks": sinks, "stride": stride, "bucket": bucket,
            "results": compared, "ratios": ratios}


def format_quality(row: dict) -> str:
    ref = row["results"][2]
    lines = [table(["policy", "perplexity over the stream (strided positions)", "worst bucket vs recompute",
                    "mean bucket vs recompute", "KV bytes"],
                   [[r.label, f"{r.perplexity:.3f}",
                     f"{max(row['ratios'][r.label]):.3f}x" if r.label in row["ratios"] else "1",
                     f"{sum(row['ratios'][r.label]) / len(row['ratios'][r.label]):.3f}x"
                     if r.label in row["ratios"] else "1", f"{r.kv_bytes:,}" if r.kv_bytes else "-"]
                    for r in row["results"]])]
    lines.append(f"\n{row['model']}: {row['tokens']:,}-token stream, budget {row['budget']} tokens "
                 f"({row['sinks']} sinks), recompute every {row['stride']} positions from {row['budget']} on, "
                 f"buckets of {row['bucket']}; recompute perplexity {ref.perplexity:.3f}")
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(rows), figsize=(6.5 * len(rows), 4.2))
    for ax, row in zip(axes if len(rows) > 1 else [axes], rows):
        for r, style in zip(row["results"], ("-", "--", ":")):
            xs, ys = zip(*r.curve)
            ax.plot(xs, ys, style, label=r.label if "recompute" not in r.label else "recompute (reference)")
        ax.set_yscale("log")
        ax.set_xlabel("position in the stream (tokens)")
        ax.set_ylabel(f"perplexity per {row['bucket']} tokens")
        ax.set_title(f"{row['model']}: {row['budget']}-token cache, {row['sinks']} sinks")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def cost(model, name: str, lengths: tuple[int, ...], budget: int, sinks: int, steps: int = 16) -> list[dict]:
    """Decode tok/s and KV bytes after ``length`` stream tokens: window cache vs full cache (within context)."""
    ids = stream_ids(model, max(lengths) + steps + 1)
    rows = []
    for spec in (f"window:size={budget - sinks},sinks={sinks}", "auto"):
        for length in lengths:
            if spec == "auto" and length + steps > model.config.max_positions:
                continue
            cache = make_cache(spec, model, batch=1, capacity=length + steps + 1)
            chunk = 512
            with torch.inference_mode():
                for start in range(0, length, chunk):
                    model(torch.tensor([ids[start:min(start + chunk, length)]]), cache=cache, logits_index=slice(0, 0))
                start_time = time.perf_counter()
                for i in range(steps):
                    model(torch.tensor([[ids[length + i]]]), cache=cache, logits_index=-1)
                seconds = time.perf_counter() - start_time
            held = cache.used_bytes if hasattr(cache, "used_bytes") else cache.nbytes
            rows.append({"model": name, "cache": spec, "length": length, "tok_s": steps / seconds, "kv_bytes": held})
            print(f"  {spec} at {length:,}: {steps / seconds:.1f} tok/s, {held:,} B", flush=True)
    return rows


def format_cost(rows: list[dict]) -> str:
    return table(["model", "cache", "tokens in the stream", "decode tok/s", "KV bytes held"],
                 [[r["model"], r["cache"], f"{r['length']:,}", f"{r['tok_s']:.1f}", f"{r['kv_bytes']:,}"]
                  for r in rows])


def engine_memory(model, name: str, prompt_tokens: int, new_tokens: int, budget: int, sinks: int) -> list[dict]:
    """One request of ``prompt_tokens + new_tokens`` in the engine: a window policy vs the full pool."""
    from ..engine.llm import LLM
    from ..engine.sequence import SamplingParams
    from ..generation.generate import generate

    prompt = stream_ids(model, prompt_tokens)
    rows = []
    for spec in (f"window:size={budget - sinks},sinks={sinks}", None):
        llm = LLM(model, kv_memory="2GiB", kv_cache=spec)
        params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
        llm.generate([prompt[:64]], SamplingParams(max_new_tokens=4))  # warm the kernels
        start = time.perf_counter()
        (out,) = llm.generate([prompt], params)
        seconds = time.perf_counter() - start
        same = out.token_ids == generate(model, prompt, new_tokens, cache=llm.kv_cache_spec, stop_token_ids=[])
        rows.append({"model": name, "engine kv_cache": spec or "auto (full)", "tokens": prompt_tokens + new_tokens,
                     "peak_kv_bytes": out.metrics.kv_bytes_peak, "released_blocks": out.metrics.released_blocks,
                     "tok_s": new_tokens / seconds, "same_as_generate": same})
        print(f"  engine {spec or 'auto'}: peak {out.metrics.kv_bytes_peak:,} B, {new_tokens / seconds:.1f} tok/s, "
              f"same tokens as generate: {same}", flush=True)
    return rows


def format_engine(rows: list[dict]) -> str:
    return table(["model", "engine kv_cache", "request tokens", "peak KV bytes", "blocks released", "tok/s",
                  "same tokens as generate"],
                 [[r["model"], f"`{r['engine kv_cache']}`", f"{r['tokens']:,}", f"{r['peak_kv_bytes']:,}",
                   f"{r['released_blocks']:,}", f"{r['tok_s']:.1f}", "yes" if r["same_as_generate"] else "NO"]
                  for r in rows])


def run(quick: bool, plot_path: str = "docs/streaming_perplexity.png") -> dict:
    shipped = load_model()
    rows = [quality(shipped, "shipped model (512-token training context)", 2048 if quick else 8192, 256, 4,
                    64 if quick else 32, 256 if quick else 512)]
    real = None
    if not quick and hub.available_offline(hub.REAL_MODEL):
        real = load_model(hub.REAL_MODEL)
        rows.append(quality(real, "SmolLM2-135M", 32768, 1024, 4, 64, 2048))
    for row in rows:
        print("\n" + format_quality(row), flush=True)
    picture = plot(rows, plot_path) if not quick else None
    if picture:
        print(f"\nplot: {picture}")
    cost_rows = cost(real or shipped, "SmolLM2-135M" if real else "shipped model",
                     (256, 1024) if quick else (1024, 4096, 8000, 16384, 32768), 1024 if real else 256, 4,
                     4 if quick else 16)
    print("\n" + format_cost(cost_rows))
    engine_rows = engine_memory(real or shipped, "SmolLM2-135M" if real else "shipped model", 256 if quick else 1024,
                                32 if quick else 3000, 1024 if real else 256, 4)
    print("\n" + format_engine(engine_rows))
    return {"quality": [{k: v for k, v in r.items() if k != "results"} |
                        {"perplexity": {x.label: x.perplexity for x in r["results"]}} for r in rows],
            "cost": cost_rows, "engine": engine_rows}

