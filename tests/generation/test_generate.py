"""Generation: cached == uncached, sampling, filtering, streaming, stop tokens, errors, isolation."""

from __future__ import annotations

import itertools
import math

import numpy as np
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
    (PROMPT, 4, {"temperature": 1.0, "top_k": 2.5}, TypeError, "top_k"),
    (PROMPT, 4, {"temperature": 1.0, "top_p": 0.0}, ValueError, "top_p"),
    (PROMPT, 4, {"temperature": 1.0, "top_p": 1.5}, ValueError, "top_p"),
    (PROMPT, 4, {"top_k": -3}, ValueError, "top_k"),  # validated even when greedy
    # prompts
    (5, 4, {}, TypeError, "sequence of token ids"),
    (np.int64(5), 4, {}, TypeError, "sequence of token ids"),
    (None, 4, {}, TypeError, "sequence of token ids"),
    (np.array([1.0, 2.0]), 4, {}, TypeError, "integers"),
    (np.array([True, False]), 4, {}, TypeError, "integers"),
    (torch.tensor([1.0, 2.0]), 4, {}, TypeError, "integers"),
    (torch.tensor([True]), 4, {}, TypeError, "integers"),
    ([1, True], 4, {}, TypeError, "integers"),
    ([1, "2"], 4, {}, TypeError, "integers"),
    (np.array([[1, 2]]), 4, {}, ValueError, "1-D"),
    (np.array(3), 4, {}, ValueError, "1-D"),
    (np.array([1, 500]), 4, {}, ValueError, "vocabulary"),
    # max_new_tokens: a real integer
    (PROMPT, True, {}, TypeError, "max_new_tokens"),
    (PROMPT, 4.0, {}, TypeError, "max_new_tokens"),
    (PROMPT, "4", {}, TypeError, "max_new_tokens"),
    (PROMPT, None, {}, TypeError, "max_new_tokens"),
    # sampling parameters: types, then ranges
    (PROMPT, 4, {"temperature": "hot"}, TypeError, "temperature"),
    (PROMPT, 4, {"temperature": None}, TypeError, "temperature"),
    (PROMPT, 4, {"temperature": True}, TypeError, "temperature"),
    (PROMPT, 4, {"temperature": float("inf")}, ValueError, "temperature"),
    (PROMPT, 4, {"temperature": 1.0, "top_k": True}, TypeError, "top_k"),
    (PROMPT, 4, {"temperature": 1.0, "top_k": "3"}, TypeError, "top_k"),
    (PROMPT, 4, {"temperature": 1.0, "top_p": "0.5"}, TypeError, "top_p"),
    (PROMPT, 4, {"temperature": 1.0, "top_p": True}, TypeError, "top_p"),
    (PROMPT, 4, {"temperature": 1.0, "top_p": float("nan")}, ValueError, "top_p"),
    # seed: an integer or None
    (PROMPT, 4, {"temperature": 1.0, "seed": 1.5}, TypeError, "seed"),
    (PROMPT, 4, {"temperature": 1.0, "seed": "1"}, TypeError, "seed"),
    (PROMPT, 4, {"temperature": 1.0, "seed": True}, TypeError, "seed"),
    (PROMPT, 4, {"temperature": 1.0, "seed": 2**64}, ValueError, "seed"),
    # stop_token_ids: an iterable of token ids in the vocabulary, or None
    (PROMPT, 4, {"stop_token_ids": 5}, TypeError, "stop_token_ids"),
    (PROMPT, 4, {"stop_token_ids": "ab"}, TypeError, "stop_token_ids"),
    (PROMPT, 4, {"stop_token_ids": [1.0]}, TypeError, "integers"),
    (PROMPT, 4, {"stop_token_ids": [True]}, TypeError, "integers"),
    (PROMPT, 4, {"stop_token_ids": [10_000]}, ValueError, "stop token id"),
    (PROMPT, 4, {"stop_token_ids": [-1]}, ValueError, "stop token id"),
    (PROMPT, 4, {"stop_token_ids": np.array([[1]])}, ValueError, "1-D"),
    # the rest
    (PROMPT, 4, {"use_cache": "no"}, TypeError, "use_cache"),
    (PROMPT, 4, {"callback": 5}, TypeError, "callback"),
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
    for kwargs in ({"seed": "x"}, {"stop_token_ids": [1.5]}, {"top_p": "1"}):
        with pytest.raises(TypeError):
            stream(model, [1, 2], 4, **kwargs)
    with pytest.raises(TypeError, match="max_new_tokens"):
        stream(model, [1, 2], False)


# ------------------------------------------------------------- numpy inputs

@pytest.mark.parametrize("prompt", [np.array(PROMPT), np.array(PROMPT, dtype=np.int32),
                                    np.array(PROMPT, dtype=np.uint8), [np.int64(t) for t in PROMPT],
                                    tuple(PROMPT), torch.tensor(PROMPT, dtype=torch.int32)],
                         ids=["int64 array", "int32 array", "uint8 array", "numpy scalars", "tuple", "int32 tensor"])
def test_numpy_and_other_integer_prompts_generate_like_a_list(model, prompt):
    expected = generate(model, PROMPT, 6, stop_token_ids=[])
    got = generate(model, prompt, np.int64(6), stop_token_ids=[])
    assert got == expected and all(type(t) is int for t in got)


def test_numpy_sampling_arguments_and_stop_ids(model):
    kwargs = dict(temperature=1.2, top_k=20, top_p=0.5, seed=7, stop_token_ids=[])
    expected = generate(model, PROMPT, 8, **kwargs)
    got = generate(model, PROMPT, 8, temperature=np.float64(1.2), top_k=np.int64(20), top_p=np.float32(0.5),
                   seed=np.int64(7), stop_token_ids=np.array([], dtype=np.int64))
    assert got == expected
    greedy = generate(model, PROMPT, 8, stop_token_ids=[])
    stop = greedy[2]
    first = greedy.index(stop) + 1
    for stops in (np.array([stop]), torch.tensor([stop]), (t for t in [stop]), {stop}, [np.int32(stop)]):
        assert generate(model, PROMPT, 8, stop_token_ids=stops) == greedy[:first]


def test_a_paused_or_abandoned_stream_does_not_leave_the_caller_in_inference_mode(llama):
    tokens = stream(llama, [1, 2, 3], 8, stop_token_ids=[])
    next(tokens)
    assert not torch.is_inference_mode_enabled()
    del tokens
    assert not torch.is_inference_mode_enabled()


# ---------------------------------------------------------- cache specs

@pytest.mark.parametrize("spec", ["auto", "fp32", "int8:residual=1000", "int4:residual=1000"])
def test_a_lossless_spec_generates_the_default_tokens(llama, spec):
    """A cache spec builds the cache; a residual longer than the run keeps a quantized cache exact."""
    assert generate(llama, PROMPT, 24, stop_token_ids=[], cache=spec) == generate(llama, PROMPT, 24,
                                                                                   stop_token_ids=[])


def test_a_quantized_spec_generates_close_to_exact(llama):
    exact = generate(llama, PROMPT, 40, stop_token_ids=[])
    got = generate(llama, PROMPT, 40, stop_token_ids=[], cache="int8:residual=0,group=16")
    assert len(got) == 40 and sum(a == b for a, b in zip(got, exact)) >= 30


def test_bad_specs_are_refused_before_any_work(llama):
    with pytest.raises(ValueError, match="unknown cache 'int3'"):
        stream(llama, PROMPT, 4, cache="int3")
    with pytest.raises(ValueError, match="use_cache=False"):
        stream(llama, PROMPT, 4, cache="int8", use_cache=False)
    with pytest.raises(TypeError, match="cache spec string or a kvcache"):
        stream(llama, PROMPT, 4, cache=object())
