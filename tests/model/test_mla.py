"""DeepSeek-V2/V3 (multi-head latent attention, mixture of experts) against transformers on the same random
weights: prefill and every decode step, greedy generation for 64 tokens, in ``generate`` and in the engine;
the expanded and absorbed forms against each other; the latent caches' bytes; export round trip; and the
config options we refuse."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import DEEPSEEK_BASE, save_hf_deepseek
from kvcache.caches.contiguous import ContiguousKVCache
from kvcache.caches.paged import PagedKVCache
from kvcache.engine.llm import LLM
from kvcache.engine.paged_beam import paged_beam_search
from kvcache.engine.sequence import SamplingParams
from kvcache.generation.beam import beam_search
from kvcache.generation.generate import generate
from kvcache.model.export import save_hf_checkpoint
from kvcache.model.loader import load_model
from kvcache.model.mla import LatentAttention

pytestmark = pytest.mark.usefixtures("flush_denormals")

BASE = DEEPSEEK_BASE
MOE = dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=24, n_shared_experts=1,
           first_k_dense_replace=1)
VARIANTS = {
    "v3-qlora-moe": ("deepseek_v3", dict(q_lora_rank=24, n_group=2, topk_group=1, **MOE)),
    "v3-dense": ("deepseek_v3", dict(q_lora_rank=None, first_k_dense_replace=3)),
    "v3-half-rope-yarn": ("deepseek_v3", dict(q_lora_rank=None, rope_interleave=False, n_group=4, topk_group=2,
                                              rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0,
                                                               "factor": 4.0, "original_max_position_embeddings": 64,
                                                               "mscale": 0.707, "mscale_all_dim": 0.707,
                                                               "beta_fast": 32, "beta_slow": 1}, **MOE)),
    "v2-greedy": ("deepseek_v2", dict(q_lora_rank=None, topk_method="greedy", routed_scaling_factor=1.5, **MOE)),
    "v2-qlora-groups": ("deepseek_v2", dict(q_lora_rank=24, topk_method="group_limited_greedy", n_group=4,
                                            topk_group=2, **MOE)),
}
PROMPT = [5, 17, 3, 88, 41, 9, 23, 61, 7, 14, 99, 2, 30]


save_deepseek = save_hf_deepseek


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request, tmp_path_factory):
    model_type, overrides = VARIANTS[request.param]
    path = tmp_path_factory.mktemp(request.param)
    hf = save_deepseek(path, model_type, **overrides)
    return load_model(path), hf, path


def hf_logits(hf, ids):
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0]


def test_config_and_modules(pair):
    model, hf, _ = pair
    c = model.config
    assert c.mla.latent_dim == 16 + 8 and c.cache_kv_heads == 1 and c.values_in_keys
    assert all(isinstance(b.attn, LatentAttention) for b in model.layers)
    assert (c.moe is None) == (hf.config.first_k_dense_replace >= 3)


def test_prefill_logits_match_transformers(pair):
    model, hf, _ = pair
    with torch.inference_mode():
        ours = model(torch.tensor([PROMPT]))[0]
    torch.testing.assert_close(ours, hf_logits(hf, PROMPT), atol=1e-4, rtol=1e-4)


def test_every_decode_step_matches_transformers(pair):
    """Prefill (expanded form) into the latent cache, then decode token by token (absorbed form)."""
    model, hf, _ = pair
    cache = ContiguousKVCache.for_model(model, capacity=64)
    ids = list(PROMPT)
    with torch.inference_mode():
        logits = model(torch.tensor([ids]), cache=cache)[0, -1]
        for _ in range(12):
            torch.testing.assert_close(logits, hf_logits(hf, ids)[-1], atol=1e-4, rtol=1e-4)
            ids.append(int(logits.argmax()))
            logits = model(torch.tensor([ids[-1:]]), cache=cache)[0, -1]
    assert len(cache) == len(ids)
    assert cache.nbytes == 3 * 64 * 24 * 4  # layers x capacity x (c_kv + k_pe) x fp32: one tensor, no V


def test_expanded_and_absorbed_forms_agree(pair):
    model, _, _ = pair
    with torch.inference_mode():
        expanded = model(torch.tensor([PROMPT]))[0]  # no cache: expanded
        cache = ContiguousKVCache.for_model(model, capacity=32)
        absorbed = torch.cat([model(torch.tensor([[t]]), cache=cache)[0] for t in PROMPT])  # token by token
        cache = ContiguousKVCache.for_model(model, capacity=32)
        model(torch.tensor([PROMPT[:4]]), cache=cache)  # a prefill, then a chunk over cached latents: absorbed
        chunk = model(torch.tensor([PROMPT[4:]]), cache=cache)[0]
    torch.testing.assert_close(absorbed, expanded, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(chunk, expanded[4:], atol=1e-4, rtol=1e-4)


def test_greedy_generation_matches_transformers_for_64_tokens(pair):
    model, hf, _ = pair
    ids = torch.tensor([PROMPT])
    want = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=64, min_new_tokens=64,
                       do_sample=False, pad_token_id=0)[0, len(PROMPT):].tolist()
    assert generate(model, PROMPT, 64, stop_token_ids=[]) == want
    assert generate(model, PROMPT, 64, stop_token_ids=[], use_cache=False)[:16] == want[:16]
    llm = LLM(model, num_blocks=64, block_size=8)
    assert llm.cache.v is None  # the latent pool stores [c_kv | k_pe] once
    outs = llm.generate([PROMPT, PROMPT[:5], PROMPT + [4, 4]], SamplingParams(max_new_tokens=64, ignore_eos=True))
    assert outs[0].token_ids == want
    assert outs[1].token_ids == generate(model, PROMPT[:5], 64, stop_token_ids=[])
    assert llm.block_manager.stats().blocks_in_use == 0


def test_engine_prefix_cache_sampling_and_beams(pair):
    model, _, _ = pair
    llm = LLM(model, num_blocks=96, block_size=4)
    first = llm.generate(PROMPT, SamplingParams(max_new_tokens=20, ignore_eos=True))[0]
    again = llm.generate(PROMPT + [8], SamplingParams(max_new_tokens=20, ignore_eos=True))[0]
    assert llm.stats()["prefix_hit_tokens"] >= 12  # the second prompt's blocks came from the first's cache
    assert first.token_ids == generate(model, PROMPT, 20, stop_token_ids=[])
    assert again.token_ids == generate(model, PROMPT + [8], 20, stop_token_ids=[])
    sampled = llm.generate(PROMPT, SamplingParams(max_new_tokens=12, temperature=0.9, seed=4, n=3, ignore_eos=True))
    for c in sampled[0].outputs:  # forks share the prompt's blocks copy-on-write
        assert c.token_ids == generate(model, PROMPT, 12, temperature=0.9, seed=(4 + c.index) % 2 ** 64,
                                       stop_token_ids=[])
    paged = paged_beam_search(llm, PROMPT, 3, 10, stop_token_ids=[])
    ref = beam_search(model, PROMPT, 3, 10, stop_token_ids=[])
    assert [h.token_ids for h in paged] == [h.token_ids for h in ref]
    assert llm.block_manager.stats().blocks_in_use == 0


def test_latent_bytes_against_the_expanded_cache(pair):
    model, _, _ = pair
    c = model.config
    assert PagedKVCache.bytes_per_block(c, 16) == 3 * 16 * 24 * 4
    expanded = ContiguousKVCache(3, 4, 16 + 8, capacity=64, value_dim=12)  # per-head K (nope + rope) and V
    latent = ContiguousKVCache.for_model(model, capacity=64)
    assert expanded.nbytes / latent.nbytes == 4 * (24 + 12) / 24
    LatentAttention.cache_expanded = True
    try:
        with torch.inference_mode():  # the up-projected baseline computes the same logits
            ids = list(PROMPT)
            out = [model(torch.tensor([ids[:6]]), cache=expanded)[0, -1]]
            out += [model(torch.tensor([[t]]), cache=expanded)[0, -1] for t in ids[6:]]
    finally:
        LatentAttention.cache_expanded = False
    with torch.inference_mode():
        full = model(torch.tensor([ids]))[0]
    torch.testing.assert_close(torch.stack(out), full[5:], atol=1e-4, rtol=1e-4)


def test_export_round_trip(pair, tmp_path):
    import transformers

    model, hf, _ = pair
    save_hf_checkpoint(model, tmp_path)
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    torch.testing.assert_close(hf_logits(again, PROMPT), hf_logits(hf, PROMPT), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(load_model(tmp_path)(torch.tensor([PROMPT]))[0], hf_logits(hf, PROMPT),
                               atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("change,message", [
    ({"rope_parameters": {"rope_type": "longrope", "factor": 2.0, "rope_theta": 10000.0}}, "rope_type"),
    ({"topk_method": "random"}, "unsupported topk_method"),
    ({"qk_rope_head_dim": 7}, "must be even"),
    ({"kv_lora_rank": 0}, "kv_lora_rank"),
    ({"n_group": 3}, "n_group"),
    ({"hidden_act": "gelu_10"}, "hidden_act"),
])
def test_options_we_do_not_run_are_refused_by_name(pair, tmp_path, change, message):
    _, _, path = pair
    cfg = json.loads((path / "config.json").read_text())
    if cfg["model_type"] == "deepseek_v2" and change.get("topk_method") is None and "n_group" in change:
        change = {**change, "topk_method": "group_limited_greedy"}
    if ("n_group" in change or "topk_method" in change) and cfg["first_k_dense_replace"] >= cfg["num_hidden_layers"]:
        pytest.skip("a dense model has no experts to route")
    cfg.update(change)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    from kvcache.model.config import ModelConfig

    with pytest.raises(ValueError, match=message):
        ModelConfig.from_file(tmp_path)


def test_v3_groups_of_one_expert_are_refused_by_name(tmp_path):
    from kvcache.model.config import ModelConfig

    cfg = {**BASE, **MOE, "model_type": "deepseek_v3", "n_group": 8, "topk_group": 1}
    with pytest.raises(ValueError, match="n_group=8: noaux_tc scores each group by its two best experts"):
        ModelConfig.from_hf(cfg)
    assert ModelConfig.from_hf({**cfg, "n_group": 4, "topk_group": 2}).moe.num_groups == 4


def test_quantized_caches_refuse_latents(pair):
    model, _, _ = pair
    with pytest.raises(ValueError, match="latent"):
        generate(model, PROMPT, 4, cache="int8")
    with pytest.raises(ValueError, match="latent"):
        LLM(model, num_blocks=16, kv_cache="int8")
