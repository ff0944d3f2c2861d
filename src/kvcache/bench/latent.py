"""``kvcache bench mla``: latent attention's cache and absorbed decode vs transformers and vs caching K/V.

One DeepSeek-shaped random-weight checkpoint (DeepSeek-V2-Lite's attention: 16 heads, kv_lora_rank 512,
rope 64, nope 128, v 128, no q LoRA; with hidden 1024, 8 layers and a dense MLP so that it fits and runs
here), saved by transformers and loaded by both.  For each context (a prompt of that many tokens), three
contenders decode the same greedy tokens, alternating, fp32, batch 1:

* kvcache, absorbed decode over the latent cache ``[c_kv | k_pe]`` (576 values per token and layer);
* kvcache caching the up-projected per-head K and V instead (``LatentAttention.cache_expanded``);
* transformers ``DeepseekV2ForCausalLM`` with its own cache (it caches the latent too, but re-applies
  ``kv_b_proj`` to the whole cached latent every step).

Reported: decode tok/s after the prefill, and KV bytes per token measured from each cache's tensors.
"""

from __future__ import annotations

import statistics
import tempfile
import time

import torch

from ..caches.contiguous import ContiguousKVCache
from ..model.loader import load_model
from ..model.mla import LatentAttention
from .common import table

SHAPE = dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
             num_attention_heads=16, num_key_value_heads=16, kv_lora_rank=512, q_lora_rank=None,
             qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128, first_k_dense_replace=8,
             max_position_embeddings=8448, bos_token_id=0, eos_token_id=None)
SHAPE_NAME = "DeepSeek-V2-Lite attention (16 heads, rank 512, rope 64, nope 128, v 128), hidden 1024, 8 dense layers"


def build(path: str):
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    torch.manual_seed(0)
    hf = DeepseekV2ForCausalLM(DeepseekV2Config(**SHAPE)).eval()
    with torch.no_grad():  # transformers' init is so small that greedy tokens are near-ties; widen it
        for p in hf.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.05)
    hf.save_pretrained(path)
    return hf, load_model(path)


def _ours(model, prompt: list[int], steps: int, expanded: bool) -> tuple[float, list[int], int]:
    """(decode seconds, tokens, KV bytes per token) for one run; the cache is sized to the run."""
    c = model.config
    m = c.mla
    capacity = len(prompt) + steps + 1
    if expanded:  # per-head keys (nope + rope) and values, as if K/V were cached for plain multi-head attention
        cache = ContiguousKVCache(c.num_layers, c.num_heads, m.qk_nope_head_dim + m.qk_rope_head_dim,
                                  capacity=capacity, value_dim=m.v_head_dim)
    else:
        cache = ContiguousKVCache.for_model(model, capacity=capacity)
    LatentAttention.cache_expanded = expanded
    try:
        with torch.inference_mode():
            token = int(model(torch.tensor([prompt]), cache=cache, logits_index=-1).argmax())
            out, start = [token], time.perf_counter()
            for _ in range(steps - 1):
                token = int(model(torch.tensor([[token]]), cache=cache, logits_index=-1).argmax())
                out.append(token)
            seconds = time.perf_counter() - start
    finally:
        LatentAttention.cache_expanded = False
    return seconds, out, cache.nbytes // capacity


def _hf(hf, prompt: list[int], steps: int) -> tuple[float, list[int], int]:
    from transformers import DynamicCache

    cache = DynamicCache(config=hf.config)
    with torch.inference_mode():
        logits = hf(torch.tensor([prompt]), cache=cache, use_cache=True, logits_to_keep=1).logits
        token = int(logits[0, -1].argmax())
        out, start = [token], time.perf_counter()
        for _ in range(steps - 1):
            logits = hf(torch.tensor([[token]]), cache=cache, use_cache=True).logits
            token = int(logits[0, -1].argmax())
            out.append(token)
        seconds = time.perf_counter() - start
    tensors = [t for layer in cache.layers for t in (layer.keys, layer.values) if t is not None]
    return seconds, out, sum(t.nbytes for t in tensors) // tensors[0].shape[-2]


def bench_mla(contexts=(512, 2048, 8192), steps=None, rounds: int = 2) -> list[dict]:
    steps = steps or {512: 32, 2048: 16, 8192: 8}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        hf, ours = build(tmp)
        g = torch.Generator().manual_seed(1)
        for ctx in contexts:
            prompt = torch.randint(2, SHAPE["vocab_size"], (ctx,), generator=g).tolist()
            n = steps[ctx] if isinstance(steps, dict) else steps
            runs = {"latent": [], "expanded": [], "transformers": []}
            tokens, kv = {}, {}
            for _ in range(rounds):  # alternating
                for name in runs:
                    seconds, out, per_token = (_hf(hf, prompt, n) if name == "transformers"
                                               else _ours(ours, prompt, n, expanded=name == "expanded"))
                    runs[name].append(seconds)
                    tokens[name], kv[name] = out, per_token
            tok_s = {name: (n - 1) / statistics.median(times) for name, times in runs.items()}
            rows.append({"context": ctx, "steps": n, **{f"{k}_tok_s": v for k, v in tok_s.items()},
                         **{f"{k}_kv_bytes_per_token": v for k, v in kv.items()},
                         "vs_transformers": tok_s["latent"] / tok_s["transformers"],
                         "vs_expanded": tok_s["latent"] / tok_s["expanded"],
                         "same_tokens": tokens["latent"] == tokens["expanded"] == tokens["transformers"]})
            print(format_table(rows[-1:]).splitlines()[-1], flush=True)
    return rows


def format_table(rows: list[dict]) -> str:
    return table(
        ["context", "latent (absorbed) tok/s", "expanded K/V cache tok/s", "transformers tok/s", "vs transformers",
         "vs expanded", "KV B/token: latent / expanded / transformers", "same tokens"],
        [[f"{r['context']:,}", f"{r['latent_tok_s']:.1f}", f"{r['expanded_tok_s']:.1f}",
          f"{r['transformers_tok_s']:.1f}", f"{r['vs_transformers']:.2f}x", f"{r['vs_expanded']:.2f}x",
          f"{r['latent_kv_bytes_per_token']:,} / {r['expanded_kv_bytes_per_token']:,} / "
          f"{r['transformers_kv_bytes_per_token']:,}", "yes" if r["same_tokens"] else "no"] for r in rows])


def run(quick: bool) -> list[dict]:
    print(f"shape: {SHAPE_NAME}; fp32, batch 1, greedy\n")
    rows = bench_mla(contexts=(64, 128), steps=4, rounds=1) if quick else bench_mla()
    print("\n" + format_table(rows))
    latent, expanded = rows[0]["latent_kv_bytes_per_token"], rows[0]["expanded_kv_bytes_per_token"]
    print(f"\nKV memory: the latent cache holds {latent:,} B per token, 1/{expanded / latent:.1f} of the expanded "
          f"K/V cache ({expanded:,} B)")
    return rows
