"""Generation: cached == uncached, sampling, filtering, streaming, stop tokens, errors, isolation."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from kvcache.caches.contiguous import ContiguousKVCache
from kvcache.generation.generate import generate, stream
from kvcache.generation.sampling import filter_logits
from kvcache.model.loader import load_model

PROMPT = [3, 17, 42, 8, 29, 11, 5]


@pytest.fixture(scope="module")
def model(model_dir):
    return load_model(model_dir)


@pytest.fixture(scope="module")
def llama(llama_dir):
    return load_model(llama_dir)


# ---------------------------------------------------------- cache correctness

def test_cached_equals_uncached_generation(model):
    cached = generate(model, PROMPT, 64, stop_token_ids=[])
    uncached = generate(model, PROMPT, 64, stop_token_ids=[], use_cache=False)
    assert len(cached) == 64
    assert cached == uncached


def test_stepwise_cached_logits_match_full_forward(model):
    tokens = PROMPT + generate(model, PROMPT, 64, stop_token_ids=[])
    with torch.inference_mode():
        full = model(torch.tensor([tokens]))[0]  # uncached, one pass over the whole sequence
        cache = ContiguousKVCache.for_model(model, capacity=4)  # small: growth happens mid-generation
        steps = [model(torch.tensor([PROMPT]), cache=cache)[0]]
        for token in tokens[len(PROMPT):]:
            steps.append(model(torch.tensor([[token]]), cache=cache)[0])
    stepwise = torch.cat(steps)
    assert len(cache) == len(tokens)
    assert stepwise.shape == full.shape
    torch.testing.assert_close(stepwise, full, rtol=0, atol=1e-4)


# ------------------------------------------------------------------ sampling

def test_same_seed_reproducible_different_seeds_differ(model):
    kwargs = dict(temperature=1.5, stop_token_ids=[])
    a = generate(model, PROMPT, 24, seed=1234, **kwargs)
    assert generate(model, PROMPT, 24, seed=1234, **kwargs) == a
    others = [generate(model, PROMPT, 24, seed=s, **kwargs) for s in (1, 2)]
    assert all(o != a for o in others) and others[0] != others[1]


def test_top_k_1_is_greedy(model):
    greedy = generate(model, PROMPT, 32, stop_token_ids=[])
    assert generate(model, PROMPT, 32, temperature=1.0, top_k=1, seed=5, stop_token_ids=[]) == greedy
    assert generate(model, PROMPT, 32, temperature=3.0, top_p=1e-6, seed=5, stop_token_ids=[]) == greedy


PROBS = [0.5, 0.3, 0.15, 0.05]


@pytest.mark.parametrize("top_k,top_p,kept", [
    (None, 0.4, {0.5}),
    (None, 0.7, {0.5, 0.3}),
    (None, 0.85, {0.5, 0.3, 0.15}),
    (None, 0.97, {0.5, 0.3, 0.15, 0.05}),
    (None, 1.0, {0.5, 0.3, 0.15, 0.05}),
    (1, None, {0.5}),
    (2, None, {0.5, 0.3}),
    (3, None, {0.5, 0.3, 0.15}),
    (10, None, {0.5, 0.3, 0.15, 0.05}),
    (3, 0.7, {0.5, 0.3}),
    (2, 0.97, {0.5, 0.3}),
])
def test_filter_logits_keeps_expected_set(top_k, top_p, kept):
    # two rows in different orders: filtering must follow each row's own ranking
    orders = [[2, 0, 3, 1], [1, 3, 0, 2]]
    logits = torch.tensor([[math.log(PROBS[i]) for i in order] for order in orders])
    out = filter_logits(logits, top_k, top_p)
    for row, order in enumerate(orders):
        got = {PROBS[i] for i, keep in zip(order, torch.isfinite(out[row]).tolist()) if keep}
        assert got == kept, (row, got)
        finite = torch.isfinite(out[row])
        assert torch.equal(out[row][finite], logits[row][finite])  # kept logits untouched
        assert (out[row][~finite] == float("-inf")).all()


# ------------------------------------------------------- streaming, callbacks

def test_stream_yields_same_tokens_and_callback_sees_each(model):
    seen = []
    tokens = generate(model, PROMPT, 20, stop_token_ids=[], callback=seen.append)
    assert seen == tokens and len(tokens) == 20
    it = stream(model, PROMPT, 20, stop_token_ids=[])
    assert list(itertools.islice(it, 3)) == tokens[:3]  # tokens arrive one at a time
    assert list(it) == tokens[3:]


def test_max_new_tokens_zero(model):
    assert generate(model, PROMPT, 0) == []


# ------------------------------------------------------------------- stopping

def _prompt_with_new_token_at_step_3(model):
    for start in range(1, 40):
        prompt = [start, (start * 7) % 90, 5]
        greedy = generate(model, prompt, 8, stop_token_ids=[])
        if greedy[3] not in greedy[:3]:
            return prompt, greedy
    pytest.fail("no prompt found whose greedy step 3 produces a token not seen before")


def test_stop_token_ends_generation_right_after_it(llama):
    prompt, greedy = _prompt_with_new_token_at_step_3(llama)
    out = generate(llama, prompt, 8, stop_token_ids=[greedy[3]])
    assert out == greedy[:4]
    assert list(stream(llama, prompt, 8, stop_token_ids=[greedy[3]])) == greedy[:4]


def test_default_stop_tokens_are_the_tokenizer_eos(llama, monkeypatch):
    prompt, greedy = _prompt_with_new_token_at_step_3(llama)
    monkeypatch.setattr(llama.tokenizer, "eos_token_ids", [greedy[3]])
    assert generate(llama, prompt, 8) == greedy[:4]
    assert generate(llama, prompt, 8, stop_token_ids=[]) == greedy


# --------------------------------------------------------------------- errors

@pytest.mark.parametrize("prompt,max_new,kwargs,exc,match", [
    ([], 4, {}, ValueError, "empty"),
    ([1, 10_000], 4, {}, ValueError, "vocabulary"),
    ([1, -1], 4, {}, ValueError, "vocabulary"),
    ("hello", 4, {}, TypeError, "token ids"),
    ([1, 2.0], 4, {}, TypeError, "integers"),
    (torch.tensor([[1, 2]]), 4, {}, ValueError, "1-D"),
    (PROMPT, -1, {}, ValueError, "max_new_tokens"),
    (PROMPT, 250, {}, ValueError, "maximum"),  # 7 + 250 = 257 > 256 positions
    (PROMPT, 4, {"temperature": -0.5}, ValueError, "temperature"),
    (PROMPT, 4, {"temperature": float("nan")}, ValueError, "temperature"),
    (PROMPT, 4, {"temperature": 1.0, "top_k": 0}, ValueError, "top_k"),
    (PROMPT, 4, {"temperature": 1.0, "top_k": 2.5}, ValueError, "top_k"),
    (PROMPT, 4, {"temperature": 1.0, "top_p": 0.0}, ValueError, "top_p"),
    (PROMPT, 4, {"temperature": 1.0, "top_p": 1.5}, ValueError, "top_p"),
    (PROMPT, 4, {"top_k": -3}, ValueError, "top_k"),  # validated even when greedy
])
def test_bad_arguments_raise(model, prompt, max_new, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        generate(model, prompt, max_new, **kwargs)


def test_exact_position_limit_is_allowed(model):
    limit = model.config.max_positions
    out = generate(model, [1] * (limit - 2), 2, stop_token_ids=[])
    assert len(out) == 2


# ------------------------------------------------------------------ isolation

def test_generations_do_not_contaminate_each_other(model):
    other = [60, 2, 2, 31, 77]
    a1 = generate(model, PROMPT, 16, stop_token_ids=[])
    b = generate(model, other, 16, stop_token_ids=[])
    a2 = generate(model, PROMPT, 16, stop_token_ids=[])
    assert a1 == a2
    # interleaved streams each keep their own cache
    sa, sb = stream(model, PROMPT, 16, stop_token_ids=[]), stream(model, other, 16, stop_token_ids=[])
    pairs = list(zip(sa, sb))
    assert [p[0] for p in pairs] == a1 and [p[1] for p in pairs] == b


def test_stream_validates_before_the_first_token(model):
    with pytest.raises(ValueError, match="empty prompt"):
        stream(model, [], 4)  # no next(): the error must not wait for iteration
    with pytest.raises(ValueError, match="temperature"):
        stream(model, [1, 2], 4, temperature=-1.0)
