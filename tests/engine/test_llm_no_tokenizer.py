"""A model built directly has no tokenizer: the engine serves token-id prompts anyway. Stop tokens, stop
strings and text are the tokenizer's features; without one, EOS is not implied and text is None."""

from __future__ import annotations

import pytest

from kvcache.engine.llm import LLM
from kvcache.engine.sequence import SamplingParams
from kvcache.generation.beam import beam_search
from kvcache.generation.generate import generate
from kvcache.model.loader import load_model

PROMPT = [5, 17, 42, 8, 29, 11]


@pytest.fixture(scope="module")
def bare(model_dir):
    model = load_model(model_dir)
    model.tokenizer = None
    return model


def test_token_prompts_run_without_a_tokenizer(bare):
    llm = LLM(bare, num_blocks=64, block_size=4)
    greedy, sampled, stopped = llm.generate(
        [PROMPT, PROMPT[:4], PROMPT],
        [SamplingParams(max_new_tokens=8), SamplingParams(max_new_tokens=6, temperature=0.8, seed=1, n=2),
         SamplingParams(max_new_tokens=8, stop_token_ids=[generate(bare, PROMPT, 3)[2]])])
    assert greedy.token_ids == generate(bare, PROMPT, 8)  # no tokenizer: no EOS, like generate
    assert greedy.text is None and greedy.outputs[0].text is None and greedy.finish_reason == "length"
    assert [len(o.token_ids) for o in sampled.outputs] == [6, 6]
    assert stopped.finish_reason == "stop" and len(stopped.token_ids) <= 3
    hyps = llm.beam_search(PROMPT, beam_width=2, max_new_tokens=5)
    assert [h.token_ids for h in hyps] == [h.token_ids for h in beam_search(bare, PROMPT, 2, 5)]


def test_tokenizer_features_are_refused_clearly(bare):
    llm = LLM(bare, num_blocks=16, block_size=4)
    with pytest.raises(TypeError, match="no tokenizer: pass token ids"):
        llm.add_request("def f():")
    with pytest.raises(ValueError, match="stop strings .* need a tokenizer"):
        llm.add_request(PROMPT, SamplingParams(stop=["\n"]))
    with pytest.raises(ValueError, match="chat template"):
        llm.chat([{"role": "user", "content": "hi"}])
    assert not llm.has_unfinished()
