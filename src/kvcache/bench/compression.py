"""``kvcache bench compress``: prompt compression (SnapKV, H2O) on a long-prompt retrieval task from real code.

Each prompt is ~4k tokens of the Python standard library's source (the ``code`` corpus) with one line,
``NAME = "VALUE"`` (a fresh name, eight random hex digits), inserted early (5-25% deep); the prompt ends
by asking for it again (``NAME = "``).  The answer, ``VALUE"``, cannot be guessed: the model must find the
line.  Per cache policy and budget (25 / 50 / 100% of the prompt's tokens kept per KV head), after a
compressed prefill the answer's tokens are teacher-forced through the cache: accuracy is the share of
prompts where greedy decoding reproduces the whole answer (every forced position's argmax is the answer
token), and the answer's perplexity is exp of its mean negative log-likelihood.  The full cache is the
reference.  Run on SmolLM2-135M (or the shipped model when it is not pulled).
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..caches.registry import make_cache
from ..eval import corpus_text
from ..model import hub
from ..model.loader import load_model
from .common import table

NAMES = ("release_token", "mirror_key", "build_secret", "session_salt", "license_code", "upload_nonce",
         "archive_tag", "cluster_id", "signing_seed", "deploy_hash")


@dataclass
class Sample:
    prompt: list[int]
    answer: list[int]
    depth: float  # where the line sits, as a share of the prompt


def retrieval_samples(tokenizer, count: int, prompt_tokens: int, seed: int = 0) -> list[Sample]:
    """``count`` prompts of about ``prompt_tokens`` tokens, each hiding one line early in real code."""
    rng = random.Random(seed)
    code = corpus_text("code").splitlines(keepends=True)
    samples, line = [], 0
    for i in range(count):
        name = f"{NAMES[i % len(NAMES)]}_{rng.randrange(10_000, 99_999)}"
        value = "".join(rng.choice("0123456789abcdef") for _ in range(8))
        query = f'\n\n# {name} was assigned once, near the top of this file. Its value:\n{name} = "'
        budget = prompt_tokens - len(tokenizer.encode(query))
        haystack, used = [], 0
        while used < budget * 1.25:  # whole lines of code until the budget is full (lines alone overcount)
            text = code[line % len(code)]
            line += 1
            haystack.append(text)
            used += len(tokenizer.encode(text))
        depth = rng.uniform(0.05, 0.25)
        at = int(len(haystack) * depth)
        text = "".join(haystack[:at]) + f'{name} = "{value}"\n' + "".join(haystack[at:])
        prompt = tokenizer.encode(text)[:budget] + tokenizer.encode(query)
        answer = tokenizer.encode(f'{value}"')
        if name in "".join(haystack):  # the line must appear exactly once
            raise AssertionError(f"{name} already occurs in the haystack")
        samples.append(Sample(prompt, answer, depth))
    return samples


def score(model, spec: str, sample: Sample) -> tuple[bool, float, int]:
    """(greedy reproduces the answer, the answer's summed NLL, KV bytes held after prefill) under ``spec``."""
    cache = make_cache(spec, model, batch=1, capacity=len(sample.prompt) + len(sample.answer))
    with torch.inference_mode():
        logits = [model(torch.tensor([sample.prompt]), cache=cache, logits_index=-1).reshape(-1)]
        held = cache.used_bytes
        for token in sample.answer[:-1]:
            logits.append(model(torch.tensor([[token]]), cache=cache, logits_index=-1).reshape(-1))
    log_probs = F.log_softmax(torch.stack(logits).float(), -1)
    target = torch.tensor(sample.answer)
    correct = bool((log_probs.argmax(-1) == target).all())
    return correct, float(-log_probs[torch.arange(len(target)), target].sum()), held


def policies(prompt_tokens: int, window: int) -> list[tuple[str, str, int]]:
    """(label, spec, percent) for the full cache and each policy at 25 / 50 / 100% of the prompt."""
    rows = [("full cache", "auto", 100)]
    for policy in ("snapkv", "h2o"):
        for percent in (25, 50, 100):
            budget = max(window + 1, prompt_tokens * percent // 100)
            rows.append((policy, f"{policy}:budget={budget},window={window}", percent))
    return rows


def bench_compression(model, name: str, count: int, prompt_tokens: int, window: int = 32) -> list[dict]:
    samples = retrieval_samples(model.tokenizer, count, prompt_tokens)
    rows = []
    for label, spec, percent in policies(max(len(s.prompt) for s in samples), window):
        start, results = time.perf_counter(), [score(model, spec, s) for s in samples]
        answer_tokens = sum(len(s.answer) for s in samples)
        rows.append({"model": name, "policy": label, "spec": spec, "budget_percent": percent,
                     "accuracy": sum(r[0] for r in results) / len(results),
                     "answer_ppl": math.exp(sum(r[1] for r in results) / answer_tokens),
                     "kv_bytes": sum(r[2] for r in results) // len(results),
                     "prompts": len(samples), "prompt_tokens": len(samples[0].prompt),
                     "seconds": time.perf_counter() - start})
        r = rows[-1]
        print(f"  {spec}: accuracy {r['accuracy']:.0%}, answer perplexity {r['answer_ppl']:.2f}, "
              f"{r['kv_bytes']:,} KV bytes, {r['seconds']:.0f} s", flush=True)
    return rows


def format_compression(rows: list[dict]) -> str:
    return table(["model", "policy", "budget (of the prompt)", "spec", "retrieval accuracy", "answer perplexity",
                  "KV bytes after prefill"],
                 [[r["model"], r["policy"], f"{r['budget_percent']}%", f"`{r['spec']}`", f"{r['accuracy']:.0%}",
                   f"{r['answer_ppl']:.2f}", f"{r['kv_bytes']:,}"] for r in rows])


def run(quick: bool) -> list[dict]:
    real = not quick and hub.available_offline(hub.REAL_MODEL)
    model = load_model(hub.REAL_MODEL) if real else load_model()
    name = "SmolLM2-135M" if real else "shipped model"
    count, tokens = (2, 256) if quick else (12, 4096)
    rows = bench_compression(model, name, count, tokens if real else min(tokens, model.config.max_positions - 16))
    print("\n" + format_compression(rows))
    print(f"\n{rows[0]['prompts']} prompts of {rows[0]['prompt_tokens']:,} tokens; answers of 8 hex digits + quote")
    return rows
