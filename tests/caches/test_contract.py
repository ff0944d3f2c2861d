"""Every registered cache through one suite (tests/cache_contract.py): accuracy vs dense attention, crop,
select, reset, bad input.

A new cache type is one file and one registry entry; this suite then covers it (SPECS lists the registry's
names plus option variants worth covering; cache_contract.EXPECTATIONS what each is held to).
"""

from __future__ import annotations

import pytest
import torch

from cache_contract import CHECKS, EXPECTATIONS, feed, tiny_llama
from kvcache.caches.registry import REGISTRY, make_cache, parse_spec

SPECS = ["auto", "fp32", "int8", "int8:residual=0", "int8:residual=8,sinks=4,symmetric=1", "int4",
         "int4:residual=0", "int4:keys=channel,residual=0,group=16", "int4:rotate=1,residual=4,group=16",
         "int4:rotate=1,keys=channel,residual=0,group=16", "int8:kernel=0,residual=0",
         "window:size=128,positions=absolute",  # a window longer than these tests: exact (test_window.py evicts)
         "snapkv:budget=256", "h2o:budget=256"]  # budgets that hold these tests: exact (test_compressed.py drops)


def test_every_registered_name_is_covered():
    built_in = set(REGISTRY) - {"fp64", "fp16", "bf16"}
    assert {spec.split(":")[0] for spec in SPECS} >= built_in and set(EXPECTATIONS) >= built_in


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@pytest.mark.parametrize("check", CHECKS, ids=lambda check: check.__name__.removeprefix("check_"))
@pytest.mark.parametrize("spec", SPECS)
def test_contract(model, spec, check):
    check(model, spec)


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
