"""The engine pool contract: checks every ``PagedPool`` class must pass, given a spec the engine serves.

Through ``LLM(kv_cache=spec)`` on a real (random-weight) model: every token stream equals single-stream
``generate`` with the pool's own spec (``llm.kv_cache_spec``) whatever the batch -- prefix caching,
copy-on-write forks, preemption, speculative rollback -- no block leaks, and the pool honours its memory
budget.  tests/caches/test_pool_contract.py runs them over every registry entry with a pool;
tests/caches/test_new_cache_type.py over a type defined in the test.
"""

from __future__ import annotations

import random

from kvcache.caches.base import PagedPool
from kvcache.caches.registry import CacheSpec
from kvcache.engine.llm import LLM, parse_bytes
from kvcache.engine.sequence import SamplingParams
from kvcache.generation.generate import generate

RNG = random.Random(0)
BASE = [RNG.randrange(1, 90) for _ in range(40)]
PROMPTS = [BASE[:5], BASE[:17], BASE, BASE[:33] + [7, 8], [3], BASE[:16], BASE[:20] + [9] * 30]
PHRASE = BASE[:12]
GROUNDED = [PHRASE * 3 + PHRASE[:5], PHRASE[3:] * 2 + [7]]  # prompt lookup finds drafts in these


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, ignore_eos=True, **kw)


def alone(model, llm: LLM, prompt: list[int], n: int, **kw) -> list[int]:
    return generate(model, prompt, n, cache=llm.kv_cache_spec, stop_token_ids=[], **kw)


def assert_no_leak(llm: LLM) -> None:
    assert not llm.has_unfinished()
    assert llm.block_manager.stats().blocks_in_use == 0


def check_a_batch_equals_single_stream(model, spec: str) -> None:
    llm = LLM(model, num_blocks=80, kv_cache=spec, max_batch_tokens=64)  # prefills spread over steps
    assert isinstance(llm.cache, PagedPool) and type(llm.cache) is CacheSpec.parse(spec).type.pool_class()
    outs = llm.generate(PROMPTS, greedy(24))
    for prompt, out in zip(PROMPTS, outs):
        assert out.token_ids == alone(model, llm, prompt, 24), prompt
    assert_no_leak(llm)


def check_the_prefix_cache_serves_the_same_stream(model, spec: str) -> None:
    llm = LLM(model, num_blocks=80, kv_cache=spec)
    first = llm.generate([BASE], greedy(16))[0]
    later = llm.generate([BASE + [5, 6], BASE], greedy(16))
    assert later[0].metrics.cached_prompt_tokens > 0 and later[1].metrics.cached_prompt_tokens > 0
    assert later[1].token_ids == first.token_ids == alone(model, llm, BASE, 16)
    assert later[0].token_ids == alone(model, llm, BASE + [5, 6], 16)
    assert_no_leak(llm)


def check_forks_copy_on_write(model, spec: str) -> None:
    prompt = BASE[:21]  # the forks share a partial block
    params = SamplingParams(n=3, temperature=0.8, seed=1, max_new_tokens=16, ignore_eos=True)
    llm = LLM(model, num_blocks=80, kv_cache=spec)
    out = llm.generate([prompt], params)[0]
    assert llm.stats()["cow_copies"] > 0
    for i, child in enumerate(out.outputs):
        assert child.token_ids == alone(model, llm, prompt, 16, temperature=0.8, seed=1 + i)
    assert_no_leak(llm)


def check_preemption_recomputes_the_same_stream(model, spec: str) -> None:
    llm = LLM(model, num_blocks=9, kv_cache=spec)
    prompts = [BASE, PROMPTS[3], PROMPTS[6]]
    outs = llm.generate(prompts, greedy(40))
    assert llm.stats()["preemptions"] > 0
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == alone(model, llm, prompt, 40)
    assert_no_leak(llm)


def check_speculative_rollback(model, spec: str) -> None:
    llm = LLM(model, num_blocks=80, kv_cache=spec)
    echo = PHRASE + alone(model, llm, PHRASE, 16) + PHRASE  # drafts this model's own continuation of PHRASE
    prompts = [*GROUNDED, echo]
    outs = llm.generate(prompts, greedy(24, speculative="prompt-lookup:min_ngram=1,k=4"))
    assert llm.stats()["spec_drafted_tokens"] > llm.stats()["spec_accepted_tokens"] > 0
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == alone(model, llm, prompt, 24)
    assert_no_leak(llm)


def check_the_memory_budget(model, spec: str) -> None:
    budget = "2MiB"
    llm = LLM(model, kv_memory=budget, kv_cache=spec)
    pool = llm.cache
    assert pool.block_bytes > 0 and pool.num_blocks >= 1 and pool.block_size == 16
    assert pool.nbytes <= parse_bytes(budget)
    assert pool.num_blocks * pool.block_bytes <= pool.nbytes + pool.staging_blocks * pool.block_bytes
    assert str(CacheSpec.parse(llm.kv_cache_spec)) == llm.kv_cache_spec  # the canonical spec round-trips


CHECKS = [check_a_batch_equals_single_stream, check_the_prefix_cache_serves_the_same_stream,
          check_forks_copy_on_write, check_preemption_recomputes_the_same_stream, check_speculative_rollback,
          check_the_memory_budget]
