"""Every registered cache through one suite: accuracy vs dense attention, crop, select, reset, bad input.

A new cache type is one file and one registry line; this suite then covers it (SPECS lists the registry's
names plus option variants worth covering).
"""

from __future__ import annotations

import pytest
import torch

from kvcache.caches.base import Cache
from kvcache.caches.registry import REGISTRY, make_cache, parse_spec
from kvcache.model.attention import attention
from kvcache.model.config import ModelConfig
from kvcache.model.transformer import Transformer

SPECS = ["auto", "fp32", "int8", "int8:residual=0", "int8:residual=8,sinks=4,symmetric=1", "int4",
         "int4:residual=0", "int4:keys=channel,residual=0,group=16", "int4:rotate=1,residual=4,group=16",
         "int4:rotate=1,keys=channel,residual=0,group=16", "int8:kernel=0,residual=0",
         "window:size=128,positions=absolute",  # a window longer than these tests: exact (test_window.py evicts)
         "snapkv:budget=256", "h2o:budget=256"]  # budgets that hold these tests: exact (test_compressed.py drops)
# relative error of attention outputs vs dense attention on unit-normal keys/values, per kind
TOLERANCE = {"auto": 1e-5, "fp32": 1e-5, "int8": 0.02, "int4": 0.3, "window": 1e-5, "snapkv": 1e-5, "h2o": 1e-5}


def test_every_registered_name_is_covered():
    assert {spec.split(":")[0] for spec in SPECS} >= set(REGISTRY) - {"fp64", "fp16", "bf16"}


def tiny_llama(dtype=torch.float32) -> Transformer:
    config = ModelConfig(arch="llama", vocab_size=61, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                         head_dim=32,
                         intermediate_size=96, max_positions=256)
    torch.manual_seed(0)
    model = Transformer(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2) if p.dim() == 2 else None
    return model.to(dtype)


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


def kv(n, batch=1, heads=2, dim=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, heads, n, dim, generator=g), torch.randn(batch, heads, n, dim, generator=g),
            torch.randn(batch, 2 * heads, n, dim, generator=g))


def feed(model, cache, ids):
    with torch.inference_mode():
        return model(torch.tensor([ids]) if isinstance(ids[0], int) else torch.tensor(ids), cache=cache)


@pytest.mark.parametrize("spec", SPECS)
def test_attention_is_exact_or_within_its_error(model, spec):
    cache = make_cache(spec, model, capacity=16)
    assert isinstance(cache, Cache) and cache.lossless == (spec in ("auto", "fp32"))
    k, v, q = kv(120)
    out = torch.cat([cache.attend(0, q[:, :, i:i + 1], k[:, :, i:i + 1], v[:, :, i:i + 1]) for i in range(120)], 2)
    dense = attention(q, k, v)
    err = ((out - dense).norm() / dense.norm()).item()
    assert err <= TOLERANCE[spec.split(":")[0]], err
    assert len(cache) == 0 or cache.num_layers == 2  # layer 0 only was fed


@pytest.mark.parametrize("spec", SPECS)
def test_model_logits_are_close_to_uncached(model, spec):
    ids = list(range(3, 60))
    with torch.inference_mode():
        exact = model(torch.tensor([ids]))[0]
    got = feed(model, make_cache(spec, model, capacity=8), ids)[0]
    if spec in ("auto", "fp32"):
        torch.testing.assert_close(got, exact, atol=1e-4, rtol=1e-4)
    else:
        agree = (got.argmax(-1) == exact.argmax(-1)).float().mean().item()
        # random weights: a sanity bound (budgets and windows longer than the test: exact)
        agree_min = {"int8": 0.95, "int4": 0.6, "window": 1.0, "snapkv": 1.0, "h2o": 1.0}[spec.split(":")[0]]
        assert agree >= agree_min, agree


@pytest.mark.parametrize("spec", SPECS)
def test_crop_then_refeed_reproduces_the_same_logits(model, spec):
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


@pytest.mark.parametrize("spec", SPECS)
def test_select_reorders_rows_like_separate_caches(model, spec):
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


@pytest.mark.parametrize("spec", SPECS)
def test_reset_and_sizes(model, spec):
    ids = list(range(1, 50))
    cache = make_cache(spec, model, capacity=8)
    first = feed(model, cache, ids)
    assert 0 < cache.used_bytes <= cache.nbytes
    cache.reset()
    assert len(cache) == 0
    torch.testing.assert_close(feed(model, cache, ids), first)


@pytest.mark.parametrize("spec", SPECS)
def test_bad_input_leaves_the_cache_unchanged(model, spec):
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
    fresh = make_cache(spec, model, capacity=8)
    torch.testing.assert_close(feed(model, cache, ids[30:]), feed(model, fresh, ids)[:, 30:], atol=2e-4, rtol=2e-4)


def test_spec_grammar_errors_name_the_problem(model):
    assert parse_spec("int4:group=16, residual=0 ,rotate=yes") == (
        "int4", {"bits": 4, "group": 16, "residual": 0, "rotate": True})
    for spec, words in [("int9", "unknown cache 'int9'"), ("int4:bits=8", "unknown option 'bits'"),
                        ("int4:group", "not KEY=VALUE"), ("int4:group=x", "expected an integer"),
                        ("int4:group=0", "must be >= 1"), ("int4:rotate=maybe", "expected a boolean"),
                        ("int4:keys=row", "expected one of token, channel"),
                        ("int4:group=16,group=32", "given twice")]:
        with pytest.raises(ValueError, match=words):
            parse_spec(spec)
    with pytest.raises(TypeError):
        parse_spec(8)
    with pytest.raises(ValueError, match="must divide head_dim"):
        make_cache("int4:group=24", model)
    with pytest.raises(ValueError, match="multiple of 16"):
        make_cache("int4:keys=channel,group=8", model)
    with pytest.raises(ValueError, match="cannot serve this model"):
        make_cache("fp16", model)


def test_a_cache_object_is_checked_against_the_model(model):
    other = make_cache("int8", tiny_llama(), batch=2)
    with pytest.raises(ValueError, match="does not fit this model with batch 1"):
        make_cache(other, model)
    same = make_cache("int8", model)
    assert make_cache(same, model) is same


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("spec", ["auto", "int8:residual=0", "int4:rotate=1,residual=0"])
def test_every_model_dtype(spec, dtype):
    """Caches keep the model's dtype for their full-precision part; outputs come back in it and stay finite."""
    model = tiny_llama(dtype)
    ids = list(range(3, 50))
    with torch.inference_mode():
        exact = model(torch.tensor([ids]))[0].float()
    got = feed(model, make_cache(spec, model, capacity=8), ids)
    assert got.dtype == dtype and torch.isfinite(got).all()
    agree = (got[0].float().argmax(-1) == exact.argmax(-1)).float().mean().item()
    assert agree >= (0.95 if spec == "auto" else 0.6), agree


@pytest.mark.parametrize("spec", SPECS)
def test_sliding_window_attention(model, spec):
    """A Mistral-style window: every cache attends to the last ``window`` positions once it holds more."""
    if spec.split(":")[0] in ("snapkv", "h2o"):
        pytest.skip("the compressing caches refuse sliding-window models (test_compressed.py checks the refusal)")
    cache = make_cache(spec, model, capacity=16)
    k, v, q = kv(60)
    out = torch.cat([cache.attend(0, q[:, :, i:i + 1], k[:, :, i:i + 1], v[:, :, i:i + 1], window=16)
                     for i in range(60)], 2)
    dense = attention(q, k, v, window=16)
    err = ((out - dense).norm() / dense.norm()).item()
    assert err <= TOLERANCE[spec.split(":")[0]], err
