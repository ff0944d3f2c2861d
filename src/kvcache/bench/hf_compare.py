"""kvcache vs Hugging Face transformers ``generate`` on the same weights.

Both load one checkpoint: a random-weight one of a named shape (transformers'
own init, saved with save_pretrained), or the real model (``smollm2-135m``,
the converted folder of ``kvcache pull``); fp32, batch 1, greedy, runs
interleaved in one process.
Also reports how close each gets to the memory-bandwidth limit: the bytes a
decode step must read (weights + KV cache) over the measured read bandwidth
(memcpy bandwidth, bytes copied per second, is printed beside it).
"""

from __future__ import annotations

import random
import statistics
import tempfile

import torch

from ..generation.generate import generate
from ..model import hub
from ..model.loader import load_model
from ..model.shapes import hf_config_dict
from .common import copy_bandwidth, read_bandwidth, table, timed, weight_bytes


def build_pair(shape: str, path: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = hf_config_dict(shape)
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg)).eval()
    hf.save_pretrained(path)
    return hf, load_model(path)


REAL = hub.REAL_MODEL


def real_pair():
    """transformers and kvcache on the pulled real model's folder (pulled first if needed)."""
    from transformers import AutoModelForCausalLM

    folder = hub.ensure(REAL)
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval(), load_model(folder)


def bench_hf(shapes=("gpt2-small", "llama-135m"), prompt_len: int = 32, new_tokens: int = 256,
             rounds: int = 3) -> list[dict]:
    """Each shape (or ``smollm2-135m``, the real model) raced on the same weights and the same tokens."""
    bandwidth, memcpy = read_bandwidth(), copy_bandwidth()
    rows = []
    for shape in shapes:
        with tempfile.TemporaryDirectory() as tmp:
            hf, ours = real_pair() if shape == REAL else build_pair(shape, tmp)
            row = race(hf, ours, prompt_len, new_tokens, rounds)
        step_bytes = weight_bytes(ours) + row.pop("kv_per_token") * (prompt_len + new_tokens / 2)
        ceiling = bandwidth / step_bytes
        row.update(shape=shape, bytes_per_token=step_bytes, bandwidth_gb_s=bandwidth / 1e9, memcpy_gb_s=memcpy / 1e9,
                   ceiling_tok_s=ceiling, kvcache_of_ceiling=row["kvcache_tok_s"] / ceiling,
                   transformers_of_ceiling=row["transformers_tok_s"] / ceiling)
        rows.append(row)
        print(format_hf_table(rows[-1:]).splitlines()[-1], flush=True)
        del hf, ours
    return rows


def race(hf, ours, prompt_len: int, new_tokens: int, rounds: int) -> dict:
    """Median tok/s of each over ``rounds`` alternating runs of the same greedy request (EOS ignored)."""
    prompt = [random.Random(1).randrange(ours.config.vocab_size) for _ in range(prompt_len)]
    x = torch.tensor([prompt])

    # no EOS for either: min_new_tokens would instead mask EOS out of transformers' argmax, changing its tokens
    hf.generation_config.eos_token_id = None

    def run_hf():
        with torch.inference_mode():
            return hf.generate(x, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)[0, prompt_len:].tolist()

    def run_ours():
        return generate(ours, prompt, new_tokens, stop_token_ids=[])

    run_ours(), run_hf()  # warm up
    t_hf, t_ours, same = [], [], True
    for _ in range(rounds):
        t, ref = timed(run_hf)
        t_hf.append(t)
        t, out = timed(run_ours)
        t_ours.append(t)
        same &= out == ref
    c = ours.config
    ours_tps, hf_tps = new_tokens / statistics.median(t_ours), new_tokens / statistics.median(t_hf)
    return {"kvcache_tok_s": ours_tps, "transformers_tok_s": hf_tps, "ratio": ours_tps / hf_tps, "identical": same,
            "kv_per_token": 2 * c.num_layers * c.num_kv_heads * c.head_dim * 4}


def format_hf_table(rows: list[dict]) -> str:
    return table(["shape", "kvcache tok/s", "transformers tok/s", "ratio", "same tokens", "MB read/token",
                  "read GB/s", "memcpy GB/s", "ceiling tok/s", "kvcache % of ceiling", "transformers % of ceiling"],
                 [[r["shape"], f"{r['kvcache_tok_s']:.1f}", f"{r['transformers_tok_s']:.1f}", f"{r['ratio']:.2f}x",
                   "yes" if r["identical"] else "NO", f"{r['bytes_per_token'] / 1e6:.0f}",
                   f"{r['bandwidth_gb_s']:.1f}", f"{r['memcpy_gb_s']:.1f}", f"{r['ceiling_tok_s']:.1f}",
                   f"{100 * r['kvcache_of_ceiling']:.0f}%", f"{100 * r['transformers_of_ceiling']:.0f}%"]
                  for r in rows])
