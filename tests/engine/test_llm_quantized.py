"""The engine with a quantized pool (``LLM(kv_cache="int8" | "int4" | spec)``): every token stream equals
single-stream ``generate`` with the equivalent cache spec (``llm.kv_cache_spec``), whatever the batch --
prefix caching, copy-on-write forks, preemption, a small token budget and beam search included."""

from __future__ import annotations

import random

import pytest

from conftest import save_hf_llama
from kvcache.caches.paged_quantized import PagedQuantizedKVCache
from kvcache.engine.llm import LLM
from kvcache.engine.sequence import SamplingParams
from kvcache.generation.beam import beam_search
from kvcache.generation.generate import generate
from kvcache.model.loader import load_model

pytestmark = pytest.mark.usefixtures("flush_denormals")

SPECS = ["int8", "int4", "int4:rotate=1,symmetric=1", "int8:keys=channel"]
RNG = random.Random(0)
BASE = [RNG.randrange(1, 90) for _ in range(40)]
PROMPTS = [BASE[:5], BASE[:17], BASE, BASE[:33] + [7, 8], [3], BASE[:16], BASE[:20] + [9] * 30]


@pytest.fixture(scope="module", params=["gpt2", "llama", "llama-hd16"])
def model(request, gpt2_dir, llama_dir, widen, tmp_path_factory):
    if request.param == "gpt2":
        return widen(load_model(gpt2_dir))
    if request.param == "llama":  # head_dim 8: below the kernel's limits, the PyTorch path
        return load_model(llama_dir)
    path = tmp_path_factory.mktemp("llama-hd16")
    save_hf_llama(path, hidden_size=128, num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512)
    return load_model(path)


def greedy(n):
    return SamplingParams(max_new_tokens=n, ignore_eos=True)


def alone(model, llm, prompt, n, **kw):
    return generate(model, prompt, n, cache=llm.kv_cache_spec, stop_token_ids=[], **kw)


def assert_no_leak(llm):
    assert not llm.has_unfinished()
    assert llm.block_manager.stats().blocks_in_use == 0


@pytest.mark.parametrize("spec", SPECS)
def test_greedy_equals_generate_with_the_same_cache(model, spec):
    llm = LLM(model, num_blocks=80, kv_cache=spec, max_batch_tokens=64)  # prefills spread over steps
    assert isinstance(llm.cache, PagedQuantizedKVCache)
    outs = llm.generate(PROMPTS, greedy(30))
    for prompt, out in zip(PROMPTS, outs):
        assert out.token_ids == alone(model, llm, prompt, 30), prompt
    assert_no_leak(llm)


def test_quantization_is_really_applied(model):
    """int4 changes the logits (so the test above could fail): the engine's int4 stream equals int4 generate,
    and at least one prompt's stream differs from the exact one."""
    llm = LLM(model, num_blocks=80, kv_cache="int4:keys=token,group=16,value_group=16")
    outs = llm.generate(PROMPTS, greedy(30))
    exact = [generate(model, p, 30, stop_token_ids=[]) for p in PROMPTS]
    assert any(o.token_ids != e for o, e in zip(outs, exact))
    assert all(o.token_ids == alone(model, llm, p, 30) for o, p in zip(outs, PROMPTS))
    assert int(llm.cache.store.tensors["vc"].count_nonzero()) > 0


def test_prefix_caching_and_batch_composition(model):
    llm = LLM(model, num_blocks=80, kv_cache="int8")
    first = llm.generate([BASE], greedy(20))[0]
    later = llm.generate([BASE + [5, 6], PROMPTS[1], BASE], [greedy(20)] * 3)
    assert later[0].metrics.cached_prompt_tokens == 32 and later[2].metrics.cached_prompt_tokens == 32
    assert later[2].token_ids == first.token_ids == alone(model, llm, BASE, 20)
    assert later[0].token_ids == alone(model, llm, BASE + [5, 6], 20)
    assert_no_leak(llm)


def test_parallel_sampling_forks_copy_the_block_being_filled(model):
    prompt = BASE[:21]  # the forks share a partial block: copy-on-write copies its staging rows
    params = SamplingParams(n=3, temperature=0.8, seed=1, max_new_tokens=20, ignore_eos=True)
    llm = LLM(model, num_blocks=80, kv_cache="int4")
    out = llm.generate([prompt], params)[0]
    assert llm.stats()["cow_copies"] > 0
    for i, c in enumerate(out.outputs):
        assert c.token_ids == alone(model, llm, prompt, 20, temperature=0.8, seed=1 + i)
    assert_no_leak(llm)


def test_preemption_recomputes_the_same_stream(model):
    llm = LLM(model, num_blocks=9, kv_cache="int8")
    outs = llm.generate([BASE, PROMPTS[3], PROMPTS[6]], greedy(40))
    assert llm.stats()["preemptions"] > 0
    for prompt, out in zip([BASE, PROMPTS[3], PROMPTS[6]], outs):
        assert out.token_ids == alone(model, llm, prompt, 40)
    assert len(llm.cache.slots) <= llm.kv_staging_blocks
    assert_no_leak(llm)


def test_beam_search_equals_the_reference(model):
    llm = LLM(model, num_blocks=80, kv_cache="int4")
    got = llm.beam_search(BASE[:30], beam_width=3, max_new_tokens=8, stop_token_ids=[])
    want = beam_search(model, BASE[:30], 3, 8, stop_token_ids=[], cache=llm.kv_cache_spec)
    assert [h.token_ids for h in got] == [h.token_ids for h in want]


def test_the_engine_spec_names_every_option(gpt2_dir):
    m = load_model(gpt2_dir)
    assert LLM(m, num_blocks=8, kv_cache="int8").kv_cache_spec == \
        "int8:keys=token,group=32,value_group=32,residual=0,block=16"
    assert LLM(m, num_blocks=8, kv_cache="int4:rotate=1").kv_cache_spec == \
        "int4:keys=channel,group=16,value_group=32,residual=0,block=16,rotate=1"
    assert LLM(m, num_blocks=8, block_size=32, kv_cache="int4:group=32").kv_cache_spec == \
        "int4:keys=channel,group=32,value_group=32,residual=0,block=32"
    assert LLM(m, num_blocks=8).kv_cache_spec == "auto"


@pytest.mark.parametrize("spec,block_size,message", [
    ("int8:residual=128", 16, "residual must be 0"),
    ("int8:sinks=4", 16, "sinks must be 0"),
    ("int8:block=32", 16, "block must be 16"),
    ("int4:group=32", 16, "must divide the block size"),
    ("int8", 8, "multiple of 16"),
    ("int9", 16, "unknown cache"),
    ("int8:bogus=1", 16, "unknown option"),
    ("fp16", 16, "model's dtype"),
    ("auto:dtype=float16", 16, "model's dtype"),
])
def test_bad_specs_are_refused_by_name(gpt2_dir, spec, block_size, message):
    m = load_model(gpt2_dir)
    with pytest.raises(ValueError, match=message):
        LLM(m, num_blocks=8, block_size=block_size, kv_cache=spec)


def test_capacity_is_reported_for_the_dtype(gpt2_dir):
    m = load_model(gpt2_dir)
    fp = LLM(m, kv_memory="8MiB")
    q8 = LLM(m, kv_memory="8MiB", kv_cache="int8", max_num_seqs=8)
    q4 = LLM(m, kv_memory="8MiB", kv_cache="int4", max_num_seqs=8)
    assert q8.cache.nbytes <= 8 << 20 and q4.cache.nbytes <= 8 << 20
    assert q8.capacity_tokens > 2.5 * fp.capacity_tokens
    assert q4.capacity_tokens > 1.4 * q8.capacity_tokens
    assert q8.max_concurrent(256) == 8  # one staging block per sequence that can run: max_num_seqs
    wide = LLM(m, kv_memory="8MiB", kv_cache="int8", max_num_seqs=90)
    assert wide.max_concurrent(256) > 2 * fp.max_concurrent(256)
    stats = q8.stats()
    assert stats["kv_cache"] == q8.kv_cache_spec and stats["kv_staging_blocks"] == 8
    assert stats["kv_bytes"] == q8.cache.nbytes


def test_staging_slots_are_reclaimed(gpt2_dir):
    """Requests finishing inside a block leave their staging slot behind; it is reused, never grown."""
    m = load_model(gpt2_dir)
    llm = LLM(m, num_blocks=40, kv_cache="int8", max_num_seqs=2)
    for i in range(6):
        llm.generate([BASE[: 5 + i], BASE[: 9 + i]], greedy(7))
    assert llm.cache.stage_k.shape[2] == 2 * 16
    assert_no_leak(llm)
