"""The single-stream cache contract: checks every registered ``Cache`` must pass, given a spec.

tests/caches/test_contract.py runs them over every built-in cache type; a cache type defined elsewhere
(tests/caches/test_new_cache_type.py) runs them over its own spec after ``expect(...)`` says what to hold
it to.  Accuracy is against dense attention and uncached logits; crop, select, reset and bad input too.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from kvcache.caches.base import Cache
from kvcache.caches.registry import make_cache
from kvcache.model.attention import attention
from kvcache.model.config import ModelConfig
from kvcache.model.transformer import Transformer


@dataclass(frozen=True)
class Expectation:
    """What a cache type is held to: lossless or not, the relative attention error on unit-normal keys/values,
    the greedy agreement with uncached logits (random weights: a sanity bound), sliding windows served."""

    lossless: bool
    error: float = 1e-5
    agreement: float = 1.0
    sliding_window: bool = True


EXPECTATIONS = {
    "auto": Expectation(True), "fp32": Expectation(True),
    "int8": Expectation(False, 0.02, 0.95), "int4": Expectation(False, 0.3, 0.6),
    # a window longer than these tests and budgets that hold them: exact (their own tests evict and drop)
    "window": Expectation(False), "snapkv": Expectation(False, sliding_window=False),
    "h2o": Expectation(False, sliding_window=False),
}


def expect(spec: str) -> Expectation:
    return EXPECTATIONS[spec.split(":")[0]]


def tiny_llama(dtype=torch.float32) -> Transformer:
    config = ModelConfig(arch="llama", vocab_size=61, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                         head_dim=32, intermediate_size=96, max_positions=256)
    torch.manual_seed(0)
    model = Transformer(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2) if p.dim() == 2 else None
    return model.to(dtype)


def kv(n, batch=1, heads=2, dim=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, heads, n, dim, generator=g), torch.randn(batch, heads, n, dim, generator=g),
            torch.randn(batch, 2 * heads, n, dim, generator=g))


def feed(model, cache, ids):
    with torch.inference_mode():
        return model(torch.tensor([ids]) if isinstance(ids[0], int) else torch.tensor(ids), cache=cache)


def check_attention_is_exact_or_within_its_error(model, spec):
    cache = make_cache(spec, model, capacity=16)
    assert isinstance(cache, Cache) and cache.lossless == expect(spec).lossless
    k, v, q = kv(120)
    out = torch.cat([cache.attend(0, q[:, :, i:i + 1], k[:, :, i:i + 1], v[:, :, i:i + 1]) for i in range(120)], 2)
    dense = attention(q, k, v)
    err = ((out - dense).norm() / dense.norm()).item()
    assert err <= expect(spec).error, err
    assert len(cache) == 0 or cache.num_layers == 2  # layer 0 only was fed


def check_model_logits_are_close_to_uncached(model, spec):
    ids = list(range(3, 60))
    with torch.inference_mode():
        exact = model(torch.tensor([ids]))[0]
    got = feed(model, make_cache(spec, model, capacity=8), ids)[0]
    if expect(spec).lossless:
        torch.testing.assert_close(got, exact, atol=1e-4, rtol=1e-4)
    else:
        agree = (got.argmax(-1) == exact.argmax(-1)).float().mean().item()
        # random weights: a sanity bound (budgets and windows longer than the test: exact)
        assert agree >= expect(spec).agreement, agree


def check_crop_then_refeed_reproduces_the_same_logits(model, spec):
    """Rolling back inside the full-precision part restores the exact state; deeper, kept tokens keep their
    stored (quantized) form, so a lossy cache continues close to, not equal to, its first pass."""
    ids = [(7 * i) % 61 for i in range(70)]
    cache = make_cache(spec, model, capacity=8)
    first = torch.cat([feed(model, cache, [t])[0] for t in ids])
    for keep in (69, 41, 20):  # the last token (a rejected draft: exact on every cache), then deeper
        cache.crop(keep)
        assert len(cache) == keep
        again = torch.cat([feed(model, cache, [t])[0] for t in ids[keep:]])
        if keep == 69 or cache.lossless:
            torch.testing.assert_close(again, first[keep:], atol=2e-4, rtol=2e-4)
        else:
            assert (again.argmax(-1) == first[keep:].argmax(-1)).float().mean() >= 0.8


def check_select_reorders_rows_like_separate_caches(model, spec):
    rows = [[(5 * i + r) % 61 for i in range(45)] for r in range(2)]
    batched = make_cache(spec, model, batch=2, capacity=8)
    feed(model, batched, rows)
    batched.select([1, 0, 1])
    assert batched.batch == 3
    nxt = [[11], [12], [13]]
    got = feed(model, batched, nxt)[:, -1]
    for i, row in enumerate([1, 0, 1]):
        single = make_cache(spec, model, capacity=8)
        feed(model, single, rows[row])
        torch.testing.assert_close(got[i], feed(model, single, nxt[i])[0, -1], atol=2e-4, rtol=2e-4)


def check_reset_and_sizes(model, spec):
    ids = list(range(1, 50))
    cache = make_cache(spec, model, capacity=8)
    first = feed(model, cache, ids)
    assert 0 < cache.used_bytes <= cache.nbytes
    cache.reset()
    assert len(cache) == 0
    torch.testing.assert_close(feed(model, cache, ids), first)


def check_bad_input_leaves_the_cache_unchanged(model, spec):
    ids = list(range(1, 40))
    cache = make_cache(spec, model, capacity=8)
    feed(model, cache, ids[:30])
    k, v, q = kv(1)
    bad = [(0, q, k[..., :16], v[..., :16]),  # head_dim
           (0, q, k.double(), v.double()),  # dtype
           (5, q, k, v),  # layer
           (0, q, torch.cat([k, k], 0), torch.cat([v, v], 0))]  # batch
    for args in bad:
        with pytest.raises((ValueError, TypeError, IndexError)):
            cache.attend(*args)
    for length in (-1, 31, 2.0):
        with pytest.raises((ValueError, TypeError)):
            cache.crop(length)
    for rows in ([], [1], [[0]], [0.5]):
        with pytest.raises((ValueError, TypeError, IndexError)):
            cache.select(rows)
    assert len(cache) == 30
    # unchanged: it goes on exactly as a cache that never saw the bad calls (the same chunks, so even a lossy
    # cache's codes are the same; against one 39-token feed a quantized cache could flip a code at a rounding
    # boundary on a last-bit difference)
    untouched = make_cache(spec, model, capacity=8)
    feed(model, untouched, ids[:30])
    assert torch.equal(feed(model, cache, ids[30:]), feed(model, untouched, ids[30:]))


def check_sliding_window_attention(model, spec):
    """A Mistral-style window: every cache attends to the last ``window`` positions once it holds more."""
    if not expect(spec).sliding_window:
        pytest.skip("this cache refuses sliding-window models (its own tests check the refusal)")
    cache = make_cache(spec, model, capacity=16)
    k, v, q = kv(60)
    out = torch.cat([cache.attend(0, q[:, :, i:i + 1], k[:, :, i:i + 1], v[:, :, i:i + 1], window=16)
                     for i in range(60)], 2)
    dense = attention(q, k, v, window=16)
    err = ((out - dense).norm() / dense.norm()).item()
    assert err <= expect(spec).error, err


CHECKS = [check_attention_is_exact_or_within_its_error, check_model_logits_are_close_to_uncached,
          check_crop_then_refeed_reproduces_the_same_logits, check_select_reorders_rows_like_separate_caches,
          check_reset_and_sizes, check_bad_input_leaves_the_cache_unchanged, check_sliding_window_attention]
