"""Adding a cache type to both paths is one file plus one registry entry: this file is that file.

``rounded`` stores keys and values rounded to bfloat16 (or float16) precision -- the numerics of a
half-precision cache for a float32 model.  Its single-stream class and its engine pool class are defined
here, registered with one ``register`` call, and then run, unchanged, through the single-stream contract
(tests/cache_contract.py), the engine pool contract (tests/pool_contract.py), ``generate``, ``LLM``, the
spec grammar and ``kvcache caches``.  The worked example in docs/design.md is this file.
"""

from __future__ import annotations

import pytest
import torch

import cache_contract
import pool_contract
from kvcache.caches.base import Option
from kvcache.caches.contiguous import ContiguousKVCache
from kvcache.caches.paged import PagedKVCache
from kvcache.caches.registry import REGISTRY, CacheSpec, CacheType, make_cache, parse_spec, register, unregister
from kvcache.cli import main
from kvcache.engine.llm import LLM
from kvcache.generation.generate import generate
from kvcache.model.loader import load_model

PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16}


def rounded(x: torch.Tensor, precision: str) -> torch.Tensor:
    return x.to(PRECISIONS[precision]).to(x.dtype)


class RoundedKVCache(ContiguousKVCache):
    """Single stream: the contiguous cache, fed keys and values rounded to ``precision``."""

    options = {"precision": Option(str, "bf16", "the precision keys and values are rounded to",
                                   choices=tuple(PRECISIONS))}
    lossless = False

    @classmethod
    def for_model(cls, model, batch: int = 1, capacity: int | None = None, precision: str = "bf16"):
        cache = super().for_model(model, batch=batch, capacity=capacity)
        cache.precision = precision
        return cache

    def attend(self, layer, q, k, v, window=None):
        return super().attend(layer, q, rounded(k, self.precision), rounded(v, self.precision), window=window)


class RoundedPagedKVCache(PagedKVCache):
    """The engine: the full-precision pool, fed the same rounded keys and values."""

    @classmethod
    def for_engine(cls, model, spec, sizing):
        pool = super().for_engine(model, CacheSpec.parse("auto"), sizing)
        pool.precision, pool.spec = spec.get("precision", "bf16"), str(spec)  # generate(cache=pool.spec): same tokens
        return pool

    def attend(self, layer, q, k, v, window=None):
        return super().attend(layer, q, rounded(k, self.precision), rounded(v, self.precision), window=window)


ROUNDED = CacheType("rounded", RoundedKVCache, "keys and values rounded to half precision (lossy)",
                    RoundedPagedKVCache)
SPECS = ["rounded", "rounded:precision=fp16"]


@pytest.fixture(scope="module", autouse=True)
def registered():
    register(ROUNDED)  # the one registry entry
    cache_contract.EXPECTATIONS["rounded"] = cache_contract.Expectation(False, error=0.01, agreement=0.9)
    yield
    del cache_contract.EXPECTATIONS["rounded"]
    unregister("rounded")


@pytest.fixture(scope="module")
def tiny():
    return cache_contract.tiny_llama()


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def model(request, gpt2_dir, llama_dir, widen):
    return widen(load_model(gpt2_dir)) if request.param == "gpt2" else load_model(llama_dir)


@pytest.mark.parametrize("check", cache_contract.CHECKS, ids=lambda check: check.__name__.removeprefix("check_"))
@pytest.mark.parametrize("spec", SPECS)
def test_the_single_stream_contract(tiny, spec, check):
    check(tiny, spec)


@pytest.mark.parametrize("check", pool_contract.CHECKS, ids=lambda check: check.__name__.removeprefix("check_"))
@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.usefixtures("flush_denormals")
def test_the_engine_pool_contract(model, spec, check):
    check(model, spec)


def test_the_rounding_is_really_applied(tiny):
    ids = list(range(3, 60))
    exact = cache_contract.feed(tiny, make_cache("auto", tiny, capacity=8), ids)
    for spec in SPECS:
        got = cache_contract.feed(tiny, make_cache(spec, tiny, capacity=8), ids)
        assert not torch.equal(got, exact) and (got - exact).abs().max() < 0.02 * exact.abs().max()
    cache = make_cache("rounded:precision=fp16", tiny)
    cache_contract.feed(tiny, cache, ids)
    assert torch.equal(cache.k, rounded(cache.k, "fp16"))  # every stored key is a float16 value


def test_generate_and_the_engine_agree_and_differ_from_auto(model):
    prompt = pool_contract.BASE[:20]
    llm = LLM(model, num_blocks=40, kv_cache="rounded:precision=fp16")
    assert llm.kv_cache_spec == "rounded:precision=fp16" and isinstance(llm.cache, RoundedPagedKVCache)
    out = llm.generate([prompt], pool_contract.greedy(30))[0].token_ids
    assert out == generate(model, prompt, 30, cache="rounded:precision=fp16", stop_token_ids=[])


def test_the_spec_grammar_and_the_command_line_know_it(tiny, capsys):
    assert parse_spec("rounded") == ("rounded", {}) and str(CacheSpec.parse("rounded:precision=fp16")) == SPECS[1]
    with pytest.raises(ValueError, match="expected one of bf16, fp16"):
        parse_spec("rounded:precision=fp8")
    with pytest.raises(ValueError, match="unknown option 'bits' for 'rounded'"):
        parse_spec("rounded:bits=4")
    with pytest.raises(ValueError, match="already registered"):
        register(ROUNDED)
    assert main(["caches"]) == 0
    listing = capsys.readouterr().out
    assert "rounded" in listing and "precision=bf16 (bf16|fp16)" in listing


def test_a_type_the_engine_does_not_serve_says_why(tiny):
    register(CacheType("rounded-single", RoundedKVCache, "single stream only", no_pool="a test says so"))
    try:
        assert make_cache("rounded-single", tiny).precision == "bf16"
        with pytest.raises(ValueError, match="does not serve 'rounded-single' caches: a test says so"):
            LLM(tiny, num_blocks=8, kv_cache="rounded-single")
    finally:
        unregister("rounded-single")
    assert "rounded-single" not in REGISTRY
