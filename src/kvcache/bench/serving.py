"""Engine benchmarks: batched throughput, shared-prefix serving, KV memory efficiency."""

from __future__ import annotations

import random
import statistics

from ..engine.llm import LLM
from ..engine.sequence import SamplingParams
from ..generation.generate import generate
from ..model.shapes import random_model
from .common import table, timed


def _prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1, vocab) for _ in range(length)] for _ in range(n)]


def bench_throughput(shape: str = "gpt2-small", concurrency=(1, 4, 16, 64), prompt_len: int = 32,
                     new_tokens: int = 64, sequential_requests: int = 4, kv_memory: str = "2GiB") -> list[dict]:
    """Output tokens/s of n concurrent requests in the engine vs the same requests one at a time.

    The one-at-a-time rate is measured with kvcache's single-stream ``generate``
    (the fastest path for one request) over ``sequential_requests`` requests.
    """
    model = random_model(shape)
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    seq_prompts = _prompts(sequential_requests, prompt_len, model.config.vocab_size, 0)
    generate(model, seq_prompts[0], 4, stop_token_ids=[])
    t_seq, _ = timed(lambda: [generate(model, p, new_tokens, stop_token_ids=[]) for p in seq_prompts])
    seq_tps = sequential_requests * new_tokens / t_seq
    rows = []
    for n in concurrency:
        llm = LLM(model, kv_memory=kv_memory, max_num_seqs=max(concurrency))
        prompts = _prompts(n, prompt_len, model.config.vocab_size, n)
        # warm up on other prompts of the same shape: oneDNN builds its kernels per matrix shape
        llm.generate(_prompts(n, prompt_len, model.config.vocab_size, -n),
                     SamplingParams(max_new_tokens=4, ignore_eos=True))
        t, outs = timed(llm.generate, prompts, params)
        tokens = sum(len(o.token_ids) for o in outs)
        rows.append({"shape": shape, "concurrent": n, "tok_s": tokens / t, "sequential_tok_s": seq_tps,
                     "speedup": tokens / t / seq_tps, "seconds": t})
        print(format_throughput_table(rows[-1:]).splitlines()[-1], flush=True)
    return rows


def format_throughput_table(rows: list[dict]) -> str:
    return table(["shape", "concurrent requests", "engine tok/s", "one-at-a-time tok/s", "speedup", "wall (s)"],
                 [[r["shape"], r["concurrent"], f"{r['tok_s']:.1f}", f"{r['sequential_tok_s']:.1f}",
                   f"{r['speedup']:.1f}x", f"{r['seconds']:.1f}"] for r in rows])


def bench_prefix(shape: str = "llama-135m", requests: int = 32, prefix_len: int = 1024, suffix_len: int = 16,
                 new_tokens: int = 32, kv_memory: str = "4GiB") -> list[dict]:
    """Requests sharing a long system prompt, prefix caching on vs off."""
    model = random_model(shape)
    rng = random.Random(7)
    system = [rng.randrange(1, model.config.vocab_size) for _ in range(prefix_len)]
    prompts = [system + [rng.randrange(1, model.config.vocab_size) for _ in range(suffix_len)] for _ in range(requests)]
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    rows, outputs = [], {}
    for caching in (True, False):
        llm = LLM(model, kv_memory=kv_memory, enable_prefix_caching=caching, max_batch_tokens=4096)
        # warm up on one prompt of the same length but other tokens (kernels for this shape, allocator)
        warm = [rng.randrange(1, model.config.vocab_size) for _ in range(prefix_len + suffix_len)]
        llm.generate([warm], SamplingParams(max_new_tokens=2, ignore_eos=True))
        llm.block_manager.reset_prefix_cache()
        before = llm.stats()["prefill_tokens_computed"]
        t, outs = timed(llm.generate, prompts, params)
        outputs[caching] = [o.token_ids for o in outs]
        ttft = [o.metrics.time_to_first_token for o in outs]
        rows.append({"shape": shape, "prefix_caching": caching,
                     "prefill_tokens": llm.stats()["prefill_tokens_computed"] - before,
                     "mean_ttft_s": statistics.mean(ttft), "total_s": t,
                     "cached_prompt_tokens": sum(o.metrics.cached_prompt_tokens for o in outs)})
        print(format_prefix_table(rows[-1:]).splitlines()[-1], flush=True)
    for r in rows:
        r["identical_outputs"] = outputs[True] == outputs[False]
    return rows


def format_prefix_table(rows: list[dict]) -> str:
    return table(["shape", "prefix caching", "prefill tokens computed", "prompt tokens from cache", "mean TTFT (s)",
                  "total (s)"],
                 [[r["shape"], "on" if r["prefix_caching"] else "off", f"{r['prefill_tokens']:,}",
                   f"{r['cached_prompt_tokens']:,}", f"{r['mean_ttft_s']:.2f}", f"{r['total_s']:.1f}"] for r in rows])


def bench_memory_efficiency(shape: str = "tiny-llama", requests: int = 64, block_size: int = 16,
                            max_len: int = 1024, seed: int = 3, kv_memory: str = "1GiB") -> dict:
    """Share of reserved KV memory that holds live tokens, paged vs reserving max length per sequence.

    Mixed lengths: prompts 16-512 tokens, outputs 16-256 tokens.  Sampled after
    every engine step, then averaged over steps.
    """
    model = random_model(shape)
    rng = random.Random(seed)
    llm = LLM(model, kv_memory=kv_memory, block_size=block_size, max_num_seqs=32)
    for _ in range(requests):
        prompt = [rng.randrange(1, model.config.vocab_size) for _ in range(rng.randint(16, 512))]
        llm.add_request(prompt, SamplingParams(max_new_tokens=rng.randint(16, 256), ignore_eos=True))
    paged, reserved = [], []
    bm = llm.block_manager
    while llm.has_unfinished():
        llm.step()
        running = llm.scheduler.running
        if not running:
            continue
        live = sum(bm.num_tokens(s.seq_id) for s in running)
        paged.append(live / (bm.stats().blocks_in_use * block_size))
        reserved.append(live / (len(running) * max_len))
    return {"shape": shape, "requests": requests, "block_size": block_size, "max_len": max_len,
            "paged_utilization": statistics.mean(paged), "reserved_utilization": statistics.mean(reserved),
            "steps": len(paged)}


def format_memory_table(r: dict) -> str:
    return table(["allocation", "KV bytes holding live tokens", "waste"],
                 [[f"paged (block size {r['block_size']})", f"{100 * r['paged_utilization']:.1f}%",
                   f"{100 * (1 - r['paged_utilization']):.1f}%"],
                  [f"reserve max length ({r['max_len']}) per sequence", f"{100 * r['reserved_utilization']:.1f}%",
                   f"{100 * (1 - r['reserved_utilization']):.1f}%"]])
