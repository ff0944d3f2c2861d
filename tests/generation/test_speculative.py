"""Speculative decoding is exact: greedy output equals plain greedy token for token (both proposers, both
architectures, every cache type), and sampled output has plain sampling's distribution (chi-squared)."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch

from conftest import save_hf_llama
from kvcache.caches.registry import make_cache
from kvcache.generation.generate import generate
from kvcache.generation.speculative import (
    DraftModel,
    PromptLookup,
    Proposer,
    check_spec,
    first_layers,
    make_proposer,
)
from kvcache.model.loader import load_model

pytestmark = pytest.mark.usefixtures("flush_denormals")

RNG = random.Random(0)
PHRASE = [RNG.randrange(1, 90) for _ in range(12)]
GROUNDED = PHRASE * 3 + PHRASE[:5]  # the model tends to continue the pattern: drafts get accepted
FREE = [RNG.randrange(1, 90) for _ in range(20)]


@pytest.fixture(scope="module")
def model(model_dir, widen):
    m = load_model(model_dir)
    return widen(m) if m.config.arch == "gpt2" else m


@pytest.fixture(scope="module")
def llama16(tmp_path_factory):
    """head_dim 16: the quantized kernel path."""
    path = tmp_path_factory.mktemp("llama16")
    save_hf_llama(path, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=3)
    return load_model(path)


@pytest.mark.parametrize("cache", [None, "int8", "int4", "int4:residual=0,block=16,group=16"])
@pytest.mark.parametrize("prompt", [GROUNDED, FREE], ids=["grounded", "free"])
def test_prompt_lookup_greedy_equals_plain_greedy(model, llama16, cache, prompt):
    for m in (model, llama16):
        plain = generate(m, prompt, 40, stop_token_ids=[], cache=cache)
        proposer = PromptLookup(ngram=3, min_ngram=1, k=4)
        fast = generate(m, prompt, 40, stop_token_ids=[], cache=cache, speculative=proposer)
        assert fast == plain
        assert proposer.stats.emitted == 39 and proposer.stats.drafted > 0
        if prompt is GROUNDED:
            assert proposer.stats.accepted > 0 and proposer.stats.passes < 39


@pytest.mark.parametrize("draft_kind", ["same", "other", "layers"])
def test_draft_model_greedy_equals_plain_greedy(model, tmp_path, draft_kind):
    if draft_kind == "same":
        draft = model
    elif draft_kind == "layers":
        draft = first_layers(model, 1)
    else:  # another random model with the same vocabulary
        path = tmp_path / "other"
        save_hf_llama(path, vocab_size=model.config.vocab_size, eos_token_id=model.config.vocab_size - 1,
                      num_hidden_layers=1)
        draft = load_model(path)
    proposer = DraftModel(draft, k=3)
    plain = generate(model, GROUNDED, 30, stop_token_ids=[])
    assert generate(model, GROUNDED, 30, stop_token_ids=[], speculative=proposer) == plain
    if draft_kind == "same":
        assert proposer.stats.acceptance_rate > 0.9
    # the draft's cache ends no longer than what was kept
    assert len(proposer.cache) <= len(GROUNDED) + 30


def test_stop_tokens_and_length_inside_accepted_drafts(model):
    plain = generate(model, GROUNDED, 40, stop_token_ids=[])
    stop = plain[17]
    want = plain[: plain.index(stop) + 1]
    assert generate(model, GROUNDED, 40, stop_token_ids=[stop], speculative="prompt-lookup:min_ngram=1") == want
    for n in (1, 2, 7):
        assert generate(model, GROUNDED, n, stop_token_ids=[], speculative="prompt-lookup:min_ngram=1") == plain[:n]


def test_a_callers_cache_is_left_at_the_kept_length(model):
    cache = make_cache("int8", model, capacity=128)
    out = generate(model, GROUNDED, 20, stop_token_ids=[], cache=cache, speculative="prompt-lookup:min_ngram=1")
    assert out == generate(model, GROUNDED, 20, stop_token_ids=[], cache="int8")
    assert len(cache) == len(GROUNDED) + 20 - 1  # every token but the last is in the cache, no rejected one


def _chi_squared_p(a: Counter, b: Counter, runs: int) -> float:
    """p-value of a two-sample chi-squared test that ``a`` and ``b`` (counts over ``runs`` each) share a law."""
    keys = [k for k in set(a) | set(b) if a[k] + b[k] >= 10]
    rest = (runs - sum(a[k] for k in keys), runs - sum(b[k] for k in keys))
    cells = [(a[k], b[k]) for k in keys] + ([rest] if sum(rest) else [])
    stat = sum((x - y) ** 2 / (x + y) for x, y in cells)
    df = len(cells) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


class GreedyGuess(Proposer):
    """A deterministic proposer (q one-hot, the prompt-lookup path) whose guesses are often right: the
    model's own greedy continuation."""

    def __init__(self, model, k=2):
        super().__init__(k, adaptive=False)
        self.model = model

    def propose(self, context, limit, config, generator):
        limit = min(limit, self.k)
        return (generate(self.model, context, limit, stop_token_ids=[]) if limit > 0 else []), None


KW = dict(temperature=1.3, top_k=4, stop_token_ids=[])
RUNS = 1500


def _law(m, seed0, proposer=None):
    counts, accepted = Counter(), 0
    for seed in range(RUNS):
        p = proposer() if proposer else None
        counts[tuple(generate(m, GROUNDED, 3, seed=seed0 + seed, speculative=p, **KW))] += 1
        accepted += p.stats.accepted if p else 0
    return counts, accepted


@pytest.mark.parametrize("kind", ["deterministic", "draft"])
def test_sampling_keeps_the_distribution(llama16, kind):
    """The first three sampled tokens, over many seeds: speculative and plain draw from one law."""
    draft = first_layers(llama16, 2)
    make = (lambda: GreedyGuess(llama16)) if kind == "deterministic" else (lambda: DraftModel(draft, k=2))
    plain, _ = _law(llama16, 0)
    spec, accepted = _law(llama16, 10**6, make)
    assert RUNS // 10 < accepted < RUNS * 9 // 10  # drafts were accepted, and rejected (one per run)
    assert _chi_squared_p(plain, spec, RUNS) > 1e-3


def test_the_test_notices_a_wrong_acceptance_rule(llama16, monkeypatch):
    """Accepting every draft blindly changes the law; the chi-squared test above must see it."""
    import kvcache.generation.speculative as speculative

    plain, _ = _law(llama16, 0)
    real = speculative.verify

    def accept_all(logits, draft, q, config, generator):
        kept, extra = real(logits, draft, q, config, generator)
        return (len(draft), extra) if draft else (kept, extra)

    monkeypatch.setattr(speculative, "verify", accept_all)
    spec, _ = _law(llama16, 10**6, lambda: GreedyGuess(llama16))
    assert _chi_squared_p(plain, spec, RUNS) < 1e-3


def test_prompt_lookup_takes_the_longest_most_recent_match():
    p = PromptLookup(ngram=3, min_ngram=1, k=3)
    config = None
    assert p.propose([1, 2, 3, 9, 1, 2, 3, 8, 7, 5, 2, 3], 5, config, None)[0] == [8, 7, 5]  # 2,3 latest
    assert p.propose([5, 1, 2, 3, 6, 0, 1, 2, 3], 5, config, None)[0] == [6, 0, 1]  # 1,2,3 wins over 2,3
    assert p.propose([1, 2, 3, 4], 5, config, None)[0] == []
    assert p.propose([4, 4], 5, config, None)[0] == [4]
    assert p.propose([7, 1, 7], 0, config, None)[0] == []


def test_adaptive_k():
    p = PromptLookup(k=4)
    p.update(4, 4)
    assert p.k == 6
    p.update(6, 1)
    assert p.k == 5
    fixed = PromptLookup(k=4, adaptive=False)
    fixed.update(4, 4)
    assert fixed.k == 4


@pytest.mark.parametrize("spec,message", [
    ("lookahead", "unknown speculative proposer"),
    ("prompt-lookup:n=3", "unknown option"),
    ("prompt-lookup:ngram=x", "option ngram"),
    ("prompt-lookup:ngram=2,min_ngram=3", "min_ngram"),
    ("prompt-lookup:k=0", "k must be"),
    ("draft:", "name the draft model"),
    ("draft:m,layers=0", "layers must be"),
])
def test_bad_specs_are_named(spec, message):
    with pytest.raises(ValueError, match=message):
        check_spec(spec)


def test_draft_with_another_vocabulary_is_refused(model, tmp_path):
    save_hf_llama(tmp_path, vocab_size=model.config.vocab_size + 3, eos_token_id=0, num_hidden_layers=1)
    with pytest.raises(ValueError, match="share a tokenizer"):
        generate(model, FREE, 4, speculative=DraftModel(load_model(tmp_path)))


def test_spec_strings_build_proposers(gpt2_dir):
    assert isinstance(make_proposer("prompt-lookup:ngram=4,k=2"), PromptLookup)
    draft = make_proposer(f"draft:{gpt2_dir},k=2,layers=1")
    assert isinstance(draft, DraftModel) and draft.k == 2 and draft.model.config.num_layers == 1
    with pytest.raises(ValueError, match="use_cache"):
        generate(load_model(gpt2_dir), FREE, 4, use_cache=False, speculative="prompt-lookup")
