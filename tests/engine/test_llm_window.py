"""A sliding-window (Mistral-style) model in the engine: requests longer than the window run, give generate's
tokens (and transformers' logits), and never block the other requests."""

from __future__ import annotations

import pytest
import torch

from kvcache.engine.llm import LLM
from kvcache.engine.sequence import SamplingParams
from kvcache.generation.generate import generate
from kvcache.model.loader import load_model


@pytest.fixture(scope="module")
def mistral(tmp_path_factory):
    from transformers import MistralConfig, MistralForCausalLM

    path = tmp_path_factory.mktemp("mistral")
    torch.manual_seed(1)
    hf = MistralForCausalLM(MistralConfig(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                          num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=256,
                                          sliding_window=8, bos_token_id=0, eos_token_id=100))
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.1)
    hf.eval().save_pretrained(path)
    return hf, load_model(path)


def test_requests_longer_than_the_window_equal_generate(mistral):
    hf, model = mistral
    assert model.layers[0].attn.window == 8
    prompts = [list(range(3, 23)), [5, 6, 7], list(range(40, 52)), list(range(3, 20))]  # shared prefix too
    llm = LLM(model, num_blocks=64, block_size=4, max_batch_tokens=16)  # chunked prefill across the window
    outs = llm.generate(prompts, SamplingParams(max_new_tokens=12, ignore_eos=True))
    for prompt, out in zip(prompts, outs):
        assert out.error is None and out.token_ids == generate(model, prompt, 12, stop_token_ids=[])
    with torch.no_grad():  # and generate itself is transformers' sliding-window model
        want = hf.generate(torch.tensor([prompts[0]]), max_new_tokens=12, do_sample=False, pad_token_id=0,
                           eos_token_id=None)[0, 20:].tolist()
    assert outs[0].token_ids == want
    assert not llm.has_unfinished()


@pytest.mark.parametrize("spec", ["int8:residual=0,group=16", "int4:residual=4,group=16"])
def test_a_quantized_cache_past_the_window(mistral, spec):
    """Decoding past the window reads the stored forms of the last `window` positions: each step equals dense
    windowed attention over the cache's own stored keys and values."""
    _, model = mistral
    prompt = list(range(3, 23))
    exact = generate(model, prompt, 16, stop_token_ids=[])
    got = generate(model, prompt, 16, stop_token_ids=[], cache=spec)
    assert len(got) == 16 and sum(a == b for a, b in zip(got, exact)) >= (14 if spec.startswith("int8") else 10)
    from kvcache.caches.registry import make_cache
    from kvcache.model.attention import attention

    cache = make_cache(spec, model, capacity=8)
    with torch.inference_mode():
        model(torch.tensor([prompt]), cache=cache)
        q, k, v = torch.randn(1, 8, 1, 8), torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8)
        out = cache.attend(0, q, k, v, window=8)
        keys, values = cache.materialize(0)
        torch.testing.assert_close(out, attention(q, keys[:, :, -8:], values[:, :, -8:]))


def _pool_is_empty(llm):
    s = llm.block_manager.stats()
    return s.blocks_in_use == 0 and s.blocks_free + s.blocks_cached_evictable == llm.num_blocks


def test_a_long_request_holds_bounded_memory(mistral):
    """Blocks behind the model's window go back to the pool: a request 6x longer than the pool's tokens
    runs in it, and its peak KV stays at the window plus a chunk."""
    _, model = mistral
    prompt = list(range(3, 40))
    llm = LLM(model, num_blocks=10, block_size=4, max_batch_tokens=8)  # 40 tokens of KV in all
    assert llm.window.size == 8 and llm.kv_cache_spec == "auto"
    (out,) = llm.generate([prompt], SamplingParams(max_new_tokens=210, ignore_eos=True))
    assert out.error is None and out.token_ids == generate(model, prompt, 210, stop_token_ids=[])
    held = llm.window.blocks_held(4, 8)
    assert out.metrics.kv_bytes_peak <= held * llm.kv_block_bytes
    assert out.metrics.released_blocks >= (len(prompt) + 210) // 4 - held
    assert llm.stats()["window_released_blocks"] == out.metrics.released_blocks
    assert _pool_is_empty(llm)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    from conftest import save_hf_llama

    path = tmp_path_factory.mktemp("llama-window")
    save_hf_llama(path)
    return load_model(path)


@pytest.mark.parametrize("spec", ["window:size=12,sinks=4", "window:size=9", "window:size=6,sinks=5"])
def test_an_engine_window_policy_equals_generate_with_the_same_cache(llama, spec):
    """Per-engine sinks + window on a model without its own window: every request equals single-stream
    generate with the equivalent window cache (positions=absolute), through chunked prefill, shared
    prefixes, preemption in a small pool and a prefix cache holding released blocks."""
    prompts = [list(range(3, 43)), list(range(3, 30)) + [7, 7], [5, 6, 7], list(range(50, 90)), list(range(3, 43))]
    llm = LLM(llama, kv_cache=spec, num_blocks=24, block_size=4, max_batch_tokens=10, max_num_seqs=3)
    assert llm.kv_cache_spec.endswith(",positions=absolute")
    outs = llm.generate(prompts, SamplingParams(max_new_tokens=40, ignore_eos=True))
    for prompt, out in zip(prompts, outs):
        assert out.error is None
        assert out.token_ids == generate(llama, prompt, 40, cache=llm.kv_cache_spec, stop_token_ids=[])
    assert llm.stats()["window_released_blocks"] > 0 and _pool_is_empty(llm)
    roomy = LLM(llama, kv_cache=spec, num_blocks=200, block_size=4, max_batch_tokens=10)  # nothing evicted
    first, again = (roomy.generate([prompts[0]], SamplingParams(max_new_tokens=40, ignore_eos=True))[0]
                    for _ in range(2))
    assert again.metrics.cached_prompt_tokens >= 32 and again.token_ids == first.token_ids == outs[0].token_ids


def test_window_with_speculation_and_parallel_samples(llama):
    prompt = [3, 4, 5, 6] * 8
    llm = LLM(llama, kv_cache="window:size=10,sinks=2", num_blocks=40, block_size=4)
    plain = llm.generate([prompt], SamplingParams(max_new_tokens=50, ignore_eos=True))[0].token_ids
    spec = llm.generate([prompt], SamplingParams(max_new_tokens=50, ignore_eos=True,
                                                 speculative="prompt-lookup:k=4"))[0]
    assert spec.token_ids == plain == generate(llama, prompt, 50, cache=llm.kv_cache_spec, stop_token_ids=[])
    assert spec.metrics.accepted_tokens > 0
    sampled = llm.generate([prompt], SamplingParams(max_new_tokens=30, temperature=1.0, n=3, seed=5))[0]
    assert len(sampled.outputs) == 3 and _pool_is_empty(llm)


@pytest.mark.parametrize("spec, message", [
    ("window:size=8,positions=cache", "positions=cache"),
    ("window:size=8,margin=4", "margin"),
    ("window:size=0", ">= 1"),
])
def test_window_specs_the_engine_refuses(llama, spec, message):
    with pytest.raises(ValueError, match=message):
        LLM(llama, kv_cache=spec, num_blocks=8)


def test_long_prompts_are_prefilled_in_chunks_beside_running_decodes(llama):
    """A prompt longer than the token budget takes several steps, while a running request keeps decoding
    one token per step; both equal generate."""
    llm = LLM(llama, num_blocks=64, block_size=4, max_batch_tokens=16)
    short = llm.add_request([5, 6, 7], SamplingParams(max_new_tokens=30, ignore_eos=True))
    llm.step()
    long_prompt = list(range(3, 83))
    long = llm.add_request(long_prompt, SamplingParams(max_new_tokens=5, ignore_eos=True))
    seq = llm.requests[long].sequences[0]
    chunks = []
    while seq.num_output == 0:
        before = len(llm.requests[short].sequences[0].tokens)
        llm.step()
        assert len(llm.requests[short].sequences[0].tokens) == before + 1  # never stalled
        chunks.append(seq.num_computed)
    assert len(chunks) >= 80 // 15 and all(b - a <= 15 for a, b in zip([0] + chunks, chunks))
    while llm.has_unfinished():
        llm.step()
    assert llm.output(long).token_ids == generate(llama, long_prompt, 5, stop_token_ids=[])
    assert llm.output(short).token_ids == generate(llama, [5, 6, 7], 30, stop_token_ids=[])
