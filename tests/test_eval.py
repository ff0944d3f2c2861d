"""The evaluation harness: perplexity over fixed windows, and KL / top-1 agreement of a cache vs exact."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kvcache import eval as quality
from kvcache.caches.contiguous import ContiguousKVCache
from kvcache.model.loader import load_model


@pytest.fixture(scope="module")
def shipped():
    return load_model()


def test_corpora_are_fixed_and_present():
    for name in quality.CORPORA:
        text = quality.corpus_text(name)
        assert len(text) > 100_000 and quality.corpus_text(name) == text
    with pytest.raises(ValueError, match="unknown corpus"):
        quality.corpus_text("poetry")


def test_windows():
    ids = list(range(100))
    assert quality.windows(ids, 30, 1000) == [ids[0:30], ids[30:60], ids[60:90]]
    assert quality.windows(ids, 30, 65) == [ids[0:30], ids[30:60]]
    for args, match in [((ids, 1, 10), "context must be >= 2"), ((ids, 30, 10), "at least the context"),
                        ((ids[:5], 30, 100), "shorter than one window")]:
        with pytest.raises(ValueError, match=match):
            quality.windows(*args)


def test_perplexity_is_the_mean_nll(shipped):
    text = quality.corpus_text("code")[:20_000]
    r = quality.evaluate(shipped, text=text, context=64, max_tokens=256)
    ids = shipped.tokenizer.encode(text)[:256]
    with torch.inference_mode():
        nll = sum(F.cross_entropy(shipped(torch.tensor([w[:-1]]))[0], torch.tensor(w[1:]), reduction="sum").item()
                  for w in (ids[i:i + 64] for i in range(0, 256, 64)))
    assert (r.windows, r.tokens) == (4, 4 * 63)
    assert math.isclose(r.nll_per_token, nll / r.tokens, rel_tol=1e-5)
    assert math.isclose(r.perplexity, math.exp(nll / r.tokens), rel_tol=1e-5)
    assert math.isclose(r.bits_per_byte, nll / math.log(2) / r.bytes, rel_tol=1e-5)
    assert r.kl_vs_exact is None and "kl_vs_exact" not in r.to_dict()


def exact_cache(model, batch, capacity):
    return ContiguousKVCache.for_model(model, batch=batch, capacity=capacity)


class NoisyCache(ContiguousKVCache):
    """A deliberately lossy cache: stored keys get noise. The harness must see the damage."""

    def update(self, layer, k, v):
        return super().update(layer, k + 0.5 * torch.randn(k.shape, generator=torch.Generator().manual_seed(layer)), v)


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_exact_cache_has_zero_kl(shipped, chunk):
    r = quality.evaluate(shipped, corpus="english", context=48, max_tokens=96, cache=exact_cache, chunk=chunk)
    assert r.kl_vs_exact < 1e-6 and r.top1_agreement == 1.0
    assert math.isclose(r.perplexity, r.exact_perplexity, rel_tol=1e-4)


def test_lossy_cache_is_measured(shipped):
    noisy = quality.evaluate(shipped, corpus="code", context=64, max_tokens=128, chunk=8,
                             cache=lambda m, batch, capacity: NoisyCache.for_model(m, batch=batch, capacity=capacity))
    assert noisy.kl_vs_exact > 1e-3 and noisy.top1_agreement < 1.0
    assert noisy.perplexity != noisy.exact_perplexity


def test_real_model_perplexity_is_sane(real_model):
    r = quality.evaluate(real_model, corpus="english", context=256, max_tokens=512)
    assert 2.0 < r.perplexity < 40.0 and 0.3 < r.bits_per_byte < 1.5


def test_a_spec_string_is_evaluated_with_kl_and_chunking_does_not_matter(shipped):
    exact = quality.evaluate(shipped, corpus="code", context=96, max_tokens=192, cache="int8:residual=1000")
    assert exact.kl_vs_exact < 1e-6 and exact.cache == "int8:residual=1000"
    by_chunk = [quality.evaluate(shipped, corpus="code", context=96, max_tokens=192, chunk=chunk,
                                 cache="int4:residual=0,group=16") for chunk in (1, 13, 96)]
    assert by_chunk[0].kl_vs_exact > 1e-4 and by_chunk[0].top1_agreement < 1.0
    for other in by_chunk[1:]:  # each query sees the stored form decoding would: chunk changes nothing
        assert math.isclose(other.kl_vs_exact, by_chunk[0].kl_vs_exact, rel_tol=0.05)
    with pytest.raises(ValueError, match="unknown cache"):
        quality.evaluate(shipped, corpus="code", context=96, max_tokens=192, cache="int5")
