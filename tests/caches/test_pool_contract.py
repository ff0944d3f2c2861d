"""Every engine pool class through one suite (tests/pool_contract.py): each registry entry with a pool, on
GPT-2 and Llama random-weight models."""

from __future__ import annotations

import pytest
import torch

from conftest import save_hf_deepseek
from kvcache.caches.registry import REGISTRY
from kvcache.engine.llm import LLM
from kvcache.model.loader import load_model
from pool_contract import CHECKS

pytestmark = pytest.mark.usefixtures("flush_denormals")

# every name the engine serves in float32, with an option variant where the pool behaves differently
SPECS = ["auto", "fp32", "int8", "int4", "int4:rotate=1,symmetric=1", "window:size=48,sinks=4"]


def test_every_pool_is_covered():
    served = {name for name, kind in REGISTRY.items() if kind.pool is not None} - {"fp64", "fp16", "bf16"}
    assert {spec.split(":")[0] for spec in SPECS} == served


# the model dtypes every pool runs under: the quantized pools compute in float32 for half-precision models
# (caches/quantized.py compute_dtype), so their tokens equal generate's in every dtype
# (and attention in float32, model/attention.py ATTENTION_DTYPE), so tokens equal generate's in every dtype.
# DeepSeek (latent attention) is served by the full-precision pools; the quantized ones refuse it by name.
MODELS = ["gpt2", "llama", "gpt2-bf16", "llama-bf16", "llama-fp16", "deepseek", "deepseek-bf16"]
DTYPES = {"": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
LATENT_REFUSED = {"int8": "do not store latent", "int4": "do not store latent", "window": "does not bound latent"}


@pytest.fixture(scope="module")
def deepseek_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("deepseek")
    save_hf_deepseek(path, "deepseek_v3", q_lora_rank=None, n_routed_experts=8, num_experts_per_tok=2,
                     moe_intermediate_size=24, n_shared_experts=1, first_k_dense_replace=1, n_group=2,
                     topk_group=1)
    return path


@pytest.fixture(scope="module", params=MODELS)
def model(request, gpt2_dir, llama_dir, deepseek_dir, widen):
    arch, _, dtype = request.param.partition("-")
    if arch == "gpt2":
        return widen(load_model(gpt2_dir, dtype=DTYPES[dtype]))
    return load_model(deepseek_dir if arch == "deepseek" else llama_dir, dtype=DTYPES[dtype])


@pytest.mark.parametrize("check", CHECKS, ids=lambda check: check.__name__.removeprefix("check_"))
@pytest.mark.parametrize("spec", SPECS)
def test_pool_contract(model, spec, check):
    if spec == "fp32" and model.dtype != torch.float32:
        pytest.skip("a float32 pool for a half-precision model is refused (test_what_a_pool_cannot_store)")
    if model.config.mla is not None and spec.split(":")[0] in LATENT_REFUSED:
        pytest.skip("the quantized pools refuse latent attention (test_what_a_pool_cannot_store)")
    check(model, spec)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_what_a_pool_cannot_store_is_refused_before_anything_runs(llama_dir, deepseek_dir, dtype):
    with pytest.raises(ValueError, match=r"stores the model's dtype \((bfloat16|float16)\); use 'auto'"):
        LLM(load_model(llama_dir, dtype=dtype), num_blocks=8, kv_cache="fp32")
    for spec, message in LATENT_REFUSED.items():
        with pytest.raises(ValueError, match=message):
            LLM(load_model(deepseek_dir, dtype=dtype), num_blocks=8, kv_cache=spec)
