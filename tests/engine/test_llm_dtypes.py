"""The engine serves every dtype generate serves: fp32, fp64, fp16 and bf16 models give generate's tokens
(greedy, seeded sampling, shared prefixes through cascade attention, beam search)."""

from __future__ import annotations

import pytest
import torch

from kvcache.engine.llm import LLM
from kvcache.engine.sequence import SamplingParams
from kvcache.generation.beam import beam_search
from kvcache.generation.generate import generate
from kvcache.model.loader import load_model

pytestmark = pytest.mark.usefixtures("flush_denormals")

BASE = [5, 17, 42, 8, 29, 11, 60, 2, 33, 71, 14, 9]
PROMPTS = [BASE, BASE + [3], BASE + [4, 5], BASE[:6] + [80, 81], [7]]  # shared blocks: cascade when decoding


@pytest.fixture(scope="module", params=[torch.float64, torch.float16, torch.bfloat16])
def model(request, model_dir, widen):
    m = load_model(model_dir, pack=False)
    m = widen(m) if m.config.arch == "gpt2" else m
    return m.to(request.param)


def test_greedy_and_cascade_equal_generate(model):
    llm = LLM(model, num_blocks=64, block_size=4)
    outs = llm.generate(PROMPTS, SamplingParams(max_new_tokens=10, ignore_eos=True))
    for prompt, out in zip(PROMPTS, outs):
        assert out.token_ids == generate(model, prompt, 10, stop_token_ids=[])
    assert llm.cache.k.dtype == model.dtype


def test_seeded_sampling_equals_generate(model):
    params = SamplingParams(temperature=0.9, top_k=20, seed=5, max_new_tokens=10, ignore_eos=True)
    out = LLM(model, num_blocks=64, block_size=4).generate([BASE], params)[0]
    assert out.token_ids == generate(model, BASE, 10, stop_token_ids=[], temperature=0.9, top_k=20, seed=5)


def test_beam_search_equals_the_reference(model):
    got = LLM(model, num_blocks=64, block_size=4).beam_search(BASE, beam_width=3, max_new_tokens=6,
                                                              stop_token_ids=[])
    want = beam_search(model, BASE, 3, 6, stop_token_ids=[])
    assert [h.token_ids for h in got] == [h.token_ids for h in want]
