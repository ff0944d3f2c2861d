"""Soak: ~200 requests with shared prefixes, staggered arrivals, through a deliberately small
KV pool (preemption, eviction, prefix hits, copy-on-write). Every output must equal running
the request alone with ``generate``."""

from __future__ import annotations

import random

import pytest

from kvcache.engine.llm import LLM
from kvcache.engine.sequence import SamplingParams
from kvcache.generation.generate import generate
from kvcache.model.loader import load_model

pytestmark = pytest.mark.usefixtures("flush_denormals")

SEED = 1234
NUM_REQUESTS = 200
BS = 4


@pytest.fixture(scope="module")
def model(gpt2_dir, widen):
    """The 2-layer, 64-wide GPT-2 fixture with widened weights (see conftest.widen_weights)."""
    return widen(load_model(gpt2_dir))


def make_requests(rng):
    prefixes = [[rng.randrange(1, 90) for _ in range(24)] for _ in range(4)]
    out = []
    for _ in range(NUM_REQUESTS):
        length = rng.randint(1, 40)
        if rng.random() < 0.85:
            shared = min(length, rng.randint(1, 24))
            prompt = rng.choice(prefixes)[:shared]
        else:
            prompt = []
        prompt += [rng.randrange(1, 90) for _ in range(length - len(prompt))]
        max_new = rng.randint(1, 16)
        # some parallel-greedy requests (forks + copy-on-write under preemption), including
        # ones that finish on their first token
        n = 2 if rng.random() < 0.1 else 1
        out.append((prompt, SamplingParams(max_new_tokens=max_new, n=n, ignore_eos=True)))
    return out


def test_soak_small_pool_matches_one_at_a_time(model):
    rng = random.Random(SEED)
    requests = make_requests(rng)
    llm = LLM(model, num_blocks=40, block_size=BS, max_batch_tokens=64)

    pending, ids, steps = list(requests), [], 0
    while pending or llm.has_unfinished():
        for _ in range(rng.randint(0, 4)):  # staggered arrivals while others run
            if pending:
                prompt, params = pending.pop(0)
                ids.append(llm.add_request(prompt, params))
        llm.step()
        steps += 1
        assert llm.block_manager.stats().blocks_in_use <= llm.num_blocks
        assert steps < 20_000, "engine stopped making progress"
    outs = [llm.output(i) for i in ids]

    stats = llm.stats()
    assert stats["preemptions"] > 0
    assert stats["prefix_hit_tokens"] > 0
    assert stats["evictions"] > 0
    assert stats["cow_copies"] > 0
    assert llm.block_manager.stats().blocks_in_use == 0
    assert not llm.scheduler.running and not llm.scheduler.waiting

    mismatches = []
    for i, ((prompt, params), out) in enumerate(zip(requests, outs)):
        assert out.error is None, (i, out.error)
        want = generate(model, prompt, params.max_new_tokens, stop_token_ids=[])
        got = [c.token_ids for c in out.outputs]
        if got != [want] * params.n or any(c.finish_reason != "length" for c in out.outputs):
            mismatches.append((i, len(prompt), params.max_new_tokens, params.n, got, want))
    assert not mismatches, f"{len(mismatches)} of {len(requests)} differ, first: {mismatches[:3]}"
