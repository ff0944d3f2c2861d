"""Speculative decoding over caches that can roll back only so far (a window's margin, h2o's recent window):
a draft length the cache cannot take back is refused before the first token, naming both options; adaptive
drafts are capped at the limit, so a long run never fails part-way, and greedy tokens equal plain decoding
with the same cache."""

from __future__ import annotations

import pytest

from kvcache.caches.registry import REGISTRY, make_cache
from kvcache.generation.generate import generate, stream
from kvcache.generation.speculative import MAX_K, DraftModel, Proposer
from kvcache.model.shapes import random_model

PHRASE = [5, 9, 14, 3, 27, 8, 11, 30, 2, 17]
PROMPT = PHRASE * 6  # prompt lookup always finds a draft
BOUNDED = {  # spec -> (its rollback option, its limit)
    "window:size=24,sinks=2,margin=6": ("margin", 6),
    "window:size=24,sinks=2,margin=0": ("margin", 0),
    "h2o:budget=40,window=5": ("window", 5),
}


@pytest.fixture(scope="module")
def model():
    return random_model("tiny-llama")


def test_every_registered_cache_says_how_far_it_rolls_back(model):
    for name in set(REGISTRY) - {"fp64", "fp16", "bf16"}:  # those need a model of their dtype
        cache = make_cache(name, model, capacity=64)
        limit = cache.max_rollback
        assert limit is None or (isinstance(limit, int) and limit >= 0 and cache.rollback_option), name


class Oracle(Proposer):
    """Drafts the true continuation, so adaptive k grows, and every fourth draft starts wrong: the rejection
    then takes the whole, grown draft back."""

    def __init__(self, truth: list[int]):
        super().__init__(1, adaptive=True)
        self.truth, self.passes, self.longest = truth, 0, 0

    def propose(self, context, limit, config, generator):
        self.passes += 1
        done = len(context) - len(PROMPT)
        draft = self.truth[done:done + min(limit, self.k)]
        if draft and self.passes % 4 == 0:
            draft[0] = (draft[0] + 1) % 100
        self.longest = max(self.longest, len(draft))
        return draft, None


@pytest.mark.parametrize("spec", [s for s, (_, limit) in BOUNDED.items() if limit])
def test_adaptive_drafts_are_capped_and_match_plain_decoding(model, spec):
    plain = generate(model, PROMPT, 80, cache=spec, stop_token_ids=[])
    oracle = Oracle(plain)
    assert generate(model, PROMPT, 80, cache=spec, stop_token_ids=[], speculative=oracle) == plain
    assert oracle.longest == BOUNDED[spec][1] < MAX_K  # grew to the cache's limit, never past it


@pytest.mark.parametrize("spec", list(BOUNDED))
def test_a_draft_longer_than_the_rollback_is_refused_before_anything_runs(model, spec):
    option, limit = BOUNDED[spec]
    cache = make_cache(spec, model, capacity=len(PROMPT) + 40)
    with pytest.raises(ValueError, match=rf"k={limit + 1}\b.*{option}={limit}|{option}=0.*k={limit + 1}"):
        next(stream(model, PROMPT, 20, cache=cache, speculative=f"prompt-lookup:k={limit + 1}"))
    assert len(cache) == 0  # nothing was computed or stored


def test_the_draft_models_own_cache_is_checked_too(model):
    draft = random_model("tiny-llama", seed=1)

    proposer = DraftModel(draft, k=4, adaptive=False, cache="window:size=24,sinks=2,margin=2")
    with pytest.raises(ValueError, match="the draft model's cache.*margin=2"):
        generate(model, PROMPT, 10, speculative=proposer)
    ok = DraftModel(draft, k=2, adaptive=True, cache="window:size=24,sinks=2,margin=2")
    assert generate(model, PROMPT, 40, speculative=ok, stop_token_ids=[]) == generate(model, PROMPT, 40,
                                                                                      stop_token_ids=[])
