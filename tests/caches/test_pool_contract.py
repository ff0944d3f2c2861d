"""Every engine pool class through one suite (tests/pool_contract.py): each registry entry with a pool, on
GPT-2 and Llama random-weight models."""

from __future__ import annotations

import pytest

from kvcache.caches.registry import REGISTRY
from kvcache.model.loader import load_model
from pool_contract import CHECKS

pytestmark = pytest.mark.usefixtures("flush_denormals")

# every name the engine serves in float32, with an option variant where the pool behaves differently
SPECS = ["auto", "fp32", "int8", "int4", "int4:rotate=1,symmetric=1", "window:size=48,sinks=4"]


def test_every_pool_is_covered():
    served = {name for name, kind in REGISTRY.items() if kind.pool is not None} - {"fp64", "fp16", "bf16"}
    assert {spec.split(":")[0] for spec in SPECS} == served


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def model(request, gpt2_dir, llama_dir, widen):
    return widen(load_model(gpt2_dir)) if request.param == "gpt2" else load_model(llama_dir)


@pytest.mark.parametrize("check", CHECKS, ids=lambda check: check.__name__.removeprefix("check_"))
@pytest.mark.parametrize("spec", SPECS)
def test_pool_contract(model, spec, check):
    check(model, spec)
