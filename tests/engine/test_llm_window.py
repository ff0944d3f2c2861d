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
    from kvcache.caches.base import make_cache
    from kvcache.model.attention import attention

    cache = make_cache(spec, model, capacity=8)
    with torch.inference_mode():
        model(torch.tensor([prompt]), cache=cache)
        q, k, v = torch.randn(1, 8, 1, 8), torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8)
        out = cache.attend(0, q, k, v, window=8)
        keys, values = cache.materialize(0)
        torch.testing.assert_close(out, attention(q, keys[:, :, -8:], values[:, :, -8:]))
