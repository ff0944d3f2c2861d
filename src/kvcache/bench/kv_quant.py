"""Decode speed of quantized KV caches at long context, kvcache vs transformers, on the same weights.

One process, one model (the real SmolLM2-135M when it is available offline,
else random weights of its shape), fp32 weights, batch 1.  For each context
length every contender prefills the same random prompt once, then they decode
in alternating rounds (a few steps each, the same fixed token), so that they
share the machine's state.  Reported per contender: decode tok/s and its ratio
to kvcache's fp32 cache, the KV bytes held (what a decode step reads), and the
attention alone (every layer's decode attention in turn, timed without the rest
of the model), as microseconds per layer and effective GB/s of its KV bytes, and
what a whole step reads (every weight once plus the KV bytes) as GB/s against the
read bandwidth measured in the same process.

``bench_prefill`` times the other half of long context: one whole prompt in a single forward pass into a fresh
cache of each kind (what ``generate`` does with a prompt), alternating rounds, against the fp32 cache.
"""

from __future__ import annotations

import random
import statistics
import tempfile

import torch

from ..caches.registry import make_cache
from .common import read_bandwidth, table, timed, weight_bytes

OURS = ("auto", "int8", "int4")


def _transformers_caches(config) -> dict:
    from transformers import DynamicCache, QuantizedCache

    caches = {"hf DynamicCache": lambda: DynamicCache(config=config),
              "hf QuantizedCache fp8": lambda: QuantizedCache(backend="fp8", config=config)}
    try:
        import optimum.quanto  # noqa: F401

        caches["hf QuantizedCache quanto int4"] = lambda: QuantizedCache(backend="quanto", config=config, nbits=4)
    except ImportError:
        pass
    return caches


def _pair(quick: bool):
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..model import hub
    from ..model.loader import load_model
    from ..model.shapes import hf_config_dict
    from .hf_compare import real_pair

    if not quick and hub.available_offline(hub.REAL_MODEL):
        return (*real_pair(), hub.REAL_MODEL)
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(**hf_config_dict("tiny-llama"))).eval()
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        return hf, load_model(tmp), "tiny-llama (random weights)"


def bench_quantized(lengths=(512, 2048, 4096, 8192), steps: int = 8, rounds: int = 4, quick: bool = False,
                    specs=OURS) -> list[dict]:
    hf, ours, name = _pair(quick)
    hf_caches = _transformers_caches(hf.config)
    weights = weight_bytes(ours)  # the same weights in transformers' model
    rows = []
    for length in lengths:
        length = min(length, ours.config.max_positions - steps * rounds - 1)
        prompt = torch.tensor([[random.Random(length).randrange(ours.config.vocab_size) for _ in range(length)]])
        contenders = {}
        with torch.inference_mode():
            for spec in specs:
                cache = make_cache(spec, ours, capacity=length + steps * rounds + 1)
                for start in range(0, length, 1024):
                    ours(prompt[:, start:start + 1024], cache=cache, logits_index=slice(-1, None))
                contenders[f"kvcache {spec}"] = (cache, _stepper(
                    lambda t, c=cache: ours(t, cache=c, logits_index=slice(-1, None))))
            for label, make in hf_caches.items():
                cache = make()
                hf(prompt, cache=cache, logits_to_keep=1)
                contenders[label] = (cache, _stepper(lambda t, c=cache: hf(t, cache=c, logits_to_keep=1)))
            times = {label: [] for label in contenders}
            for _ in range(rounds):
                for label, (_, step) in contenders.items():
                    times[label].append(timed(step, steps)[0] / steps)
        base = statistics.median(times["kvcache auto"])
        bandwidth = read_bandwidth()
        for label, (cache, _) in contenders.items():
            per_step = statistics.median(times[label])
            kv = _kv_bytes(cache, ours)
            read = weights + kv
            attention_s = _attention_seconds(cache, ours) if label.startswith("kvcache") else None
            rows.append({"model": name, "context": length, "cache": label, "tok_s": 1 / per_step,
                         "vs_kvcache_fp32": base / per_step, "kv_mb": kv / 1e6, "mb_read_per_step": read / 1e6,
                         "gb_s": read / per_step / 1e9, "read_bandwidth_gb_s": bandwidth / 1e9,
                         "of_bandwidth": read / per_step / bandwidth,
                         "attention_us": None if attention_s is None else attention_s * 1e6,
                         "attention_gb_s": None if attention_s is None else kv / ours.config.num_layers / attention_s
                         / 1e9})
        print(format_quantized_table(rows[-len(contenders):]).split("\n", 2)[2], flush=True)
        del contenders
    return rows


def bench_prefill(lengths=(2048, 8192), rounds: int = 2, quick: bool = False, specs=OURS) -> list[dict]:
    """Seconds to prefill one prompt of each length in one forward pass, per cache spec (median of ``rounds``
    alternating rounds), and the ratio to the fp32 cache ("auto")."""
    _, ours, name = _pair(quick)
    rows = []
    for length in lengths:
        length = min(length, ours.config.max_positions - 1)
        prompt = torch.tensor([[random.Random(length).randrange(ours.config.vocab_size) for _ in range(length)]])
        times = {spec: [] for spec in specs}
        with torch.inference_mode():
            for _ in range(rounds):
                for spec in specs:
                    cache = make_cache(spec, ours, capacity=length + 1)
                    times[spec].append(timed(lambda c=cache: ours(prompt, cache=c, logits_index=slice(-1, None)))[0])
                    del cache
        base = statistics.median(times[specs[0]])
        for spec in specs:
            seconds = statistics.median(times[spec])
            rows.append({"model": name, "prompt": length, "cache": spec, "prefill_s": seconds,
                         "tok_s": length / seconds, "vs_fp32": seconds / base})
        print(format_prefill_table(rows[-len(specs):]).split("\n", 2)[2], flush=True)
    return rows


def format_prefill_table(rows: list[dict]) -> str:
    return table(["prompt tokens", "cache", "prefill s", "prompt tok/s", "time vs fp32 cache"],
                 [[r["prompt"], r["cache"], f"{r['prefill_s']:.2f}", f"{r['tok_s']:.0f}", f"{r['vs_fp32']:.2f}x"]
                  for r in rows])


def _stepper(forward):
    """``step(n)``: n decode steps of one fixed token through ``forward(token)``."""
    token = torch.tensor([[5]])

    def step(n):
        with torch.inference_mode():
            for _ in range(n):
                forward(token)
    return step


def _kv_bytes(cache, model) -> int:
    """Bytes the cache holds for its tokens (codes + scales + full-precision parts)."""
    if hasattr(cache, "used_bytes"):
        return cache.used_bytes
    return sum(_held(value) for layer in cache.layers for value in vars(layer).values())


def _held(value, depth: int = 0) -> int:
    """Bytes of the tensors inside a transformers cache layer attribute (quanto's tensors wrap theirs)."""
    if depth > 3:
        return 0
    if isinstance(value, (tuple, list)):
        return sum(_held(v, depth + 1) for v in value)
    if isinstance(value, torch.Tensor):
        inner = [v for v in getattr(value, "__dict__", {}).values() if isinstance(v, torch.Tensor)]
        if type(value) is torch.Tensor or not inner:
            return value.nbytes
        return sum(_held(v, depth + 1) for v in inner)
    return 0


def _attention_seconds(cache, model, repeats: int = 10) -> float:
    """Decode attention alone, per layer: attend one token in every layer, crop it off again (median).

    Every layer in turn, as decoding does, so the cache streams from memory instead of sitting in the CPU's
    caches (one layer of an 8k fp32 cache fits in L3).
    """
    c = model.config
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, c.num_heads, 1, c.head_dim, generator=g)
    k, v = (torch.randn(1, c.num_kv_heads, 1, c.head_dim, generator=g) for _ in range(2))
    length = len(cache)

    def all_layers():
        for layer in range(c.num_layers):
            cache.attend(layer, q, k, v)

    samples = []
    with torch.inference_mode():
        for _ in range(repeats):
            samples.append(timed(all_layers)[0] / c.num_layers)
            cache.crop(length)
    return statistics.median(samples)


def format_quantized_table(rows: list[dict]) -> str:
    return table(["context", "cache", "decode tok/s", "vs kvcache fp32", "KV MB held", "attention us/layer",
                  "attention GB/s", "MB read/step", "step GB/s", "of read bandwidth"],
                 [[r["context"], r["cache"], f"{r['tok_s']:.1f}", f"{r['vs_kvcache_fp32']:.2f}x", f"{r['kv_mb']:.1f}",
                   "" if r["attention_us"] is None else f"{r['attention_us']:.0f}",
                   "" if r["attention_gb_s"] is None else f"{r['attention_gb_s']:.1f}",
                   f"{r['mb_read_per_step']:,.0f}", f"{r['gb_s']:.1f}",
                   f"{100 * r['of_bandwidth']:.0f}% of {r['read_bandwidth_gb_s']:.1f} GB/s"] for r in rows])
