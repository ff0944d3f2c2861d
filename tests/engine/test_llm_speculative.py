"""Per-request speculative decoding (prompt lookup) in the engine: greedy results equal non-speculative
``generate`` whatever the batch, rejected drafts never stay in the block tables or the prefix cache, and it
works with the quantized pool, preemption and parallel sampling."""

from __future__ import annotations

import random

import pytest

from kvcache.engine.llm import LLM
from kvcache.engine.sequence import SamplingParams
from kvcache.generation.generate import generate
from kvcache.model.loader import load_model

pytestmark = pytest.mark.usefixtures("flush_denormals")

RNG = random.Random(0)
PHRASE = [RNG.randrange(1, 90) for _ in range(12)]
GROUNDED = [PHRASE * 3 + PHRASE[:5], PHRASE[3:] * 2 + [7], PHRASE * 2]
FREE = [[RNG.randrange(1, 90) for _ in range(n)] for n in (9, 20)]
SPEC = "prompt-lookup:min_ngram=1,k=4"


@pytest.fixture(scope="module")
def model(model_dir, widen):
    m = load_model(model_dir)
    return widen(m) if m.config.arch == "gpt2" else m


def params(max_new_tokens, speculative=SPEC, **kw):
    return SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True, speculative=speculative, **kw)


@pytest.mark.parametrize("kv_cache", [None, "int8", "int4"])
def test_greedy_equals_generate_in_a_mixed_batch(model, kv_cache):
    llm = LLM(model, num_blocks=120, block_size=16, kv_cache=kv_cache)
    prompts = GROUNDED + FREE
    plist = [params(30) for _ in GROUNDED] + [params(30, speculative=None), params(30)]
    outs = llm.generate(prompts, plist)
    spec = llm.kv_cache_spec if kv_cache else None
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == generate(model, prompt, 30, stop_token_ids=[], cache=spec)
    stats = llm.stats()
    assert stats["spec_drafted_tokens"] > stats["spec_accepted_tokens"] > 0
    assert outs[0].metrics.accepted_tokens > 0 and outs[0].metrics.decode_passes < 29
    assert outs[0].metrics.tokens_per_pass > 1 and outs[3].metrics.tokens_per_pass == 1.0  # 3: not speculating
    assert llm.block_manager.stats().blocks_in_use == 0


def test_rejected_drafts_never_reach_the_prefix_cache(model):
    """Every full block the prefix cache holds after speculative runs has exactly the KV of its tokens:
    prompts extended by the outputs hit those blocks, and their results still equal fresh runs."""
    llm = LLM(model, num_blocks=200, block_size=4)
    outs = llm.generate(GROUNDED, [params(24) for _ in GROUNDED])
    assert llm.stats()["spec_drafted_tokens"] > llm.stats()["spec_accepted_tokens"]
    longer = [p + o.token_ids for p, o in zip(GROUNDED, outs)]
    again = llm.generate(longer, [params(8, speculative=None) for _ in longer])
    assert all(a.metrics.cached_prompt_tokens > len(p) for a, p in zip(again, GROUNDED))
    for prompt, out in zip(longer, again):
        assert out.token_ids == generate(model, prompt, 8, stop_token_ids=[])


def test_preemption_and_block_boundaries(model):
    llm = LLM(model, num_blocks=22, block_size=4)
    outs = llm.generate(GROUNDED, [params(20) for _ in GROUNDED])
    assert llm.stats()["preemptions"] > 0
    for prompt, out in zip(GROUNDED, outs):
        assert out.token_ids == generate(model, prompt, 20, stop_token_ids=[])
    assert llm.block_manager.stats().blocks_in_use == 0


def test_stops_inside_a_kept_draft(model):
    plain = generate(model, GROUNDED[0], 30, stop_token_ids=[])
    stop = plain[12]
    out = LLM(model, num_blocks=64, block_size=4).generate(
        [GROUNDED[0]], SamplingParams(max_new_tokens=30, stop_token_ids=[stop], speculative=SPEC))[0]
    assert out.token_ids == plain[: plain.index(stop) + 1] and out.finish_reason == "stop"


def test_seeded_sampling_is_independent_of_the_batch(model):
    sp = params(20, temperature=0.9, seed=3, n=2)
    alone = LLM(model, num_blocks=64, block_size=4).generate([GROUNDED[0]], sp)[0]
    mixed = LLM(model, num_blocks=64, block_size=4).generate([FREE[0], GROUNDED[0]], [params(9), sp])[1]
    assert [c.token_ids for c in alone.outputs] == [c.token_ids for c in mixed.outputs]
    assert all(len(c.token_ids) == 20 for c in alone.outputs)


def test_draft_models_are_single_stream_only():
    with pytest.raises(ValueError, match="prompt lookup"):
        SamplingParams(speculative="draft:some/model")
    with pytest.raises(ValueError, match="unknown option"):
        SamplingParams(speculative="prompt-lookup:x=1")
