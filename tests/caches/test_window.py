"""The window cache (ring buffer + attention sinks): attention equals dense attention over exactly the kept
keys with the positions each convention applies, for any size, sinks, chunking and wrap-around; crop rolls
back within the margin after the ring wrapped; generation streams past the model's context."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvcache.caches.registry import make_cache, parse_spec
from kvcache.caches.window import WindowKVCache
from kvcache.generation.generate import generate
from kvcache.model.config import ModelConfig
from kvcache.model.loader import load_model
from kvcache.model.rope import apply_rope
from kvcache.model.transformer import Transformer


def tiny_llama(max_positions=256) -> Transformer:
    config = ModelConfig(arch="llama", vocab_size=61, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                         head_dim=32, intermediate_size=96, max_positions=max_positions)
    torch.manual_seed(0)
    model = Transformer(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2) if p.dim() == 2 else None
    return model


MODEL = tiny_llama()


def kept(t: int, size: int, sinks: int) -> list[int]:
    return [j for j in range(t + 1) if j < sinks or j > t - size]


def reference(q, k, v, size, sinks, cache_positions: bool):
    """Query by query: dense attention over the kept keys; positions = rank in the cache, or absolute."""
    cos, sin = MODEL.rope_cos, MODEL.rope_sin
    group = q.shape[1] // k.shape[1]
    outs = []
    for t in range(q.shape[2]):
        idx = kept(t, size, sinks)
        kpos = torch.arange(len(idx)) if cache_positions else torch.tensor(idx)
        qpos = kpos[-1:]
        kk = apply_rope(k[:, :, idx], cos[kpos], sin[kpos]).repeat_interleave(group, 1)
        qq = apply_rope(q[:, :, t:t + 1], cos[qpos], sin[qpos])
        scores = qq @ kk.transpose(-1, -2) / q.shape[-1] ** 0.5
        outs.append(torch.softmax(scores, -1) @ v[:, :, idx].repeat_interleave(group, 1))
    return torch.cat(outs, 2)


def run(cache, q, k, v, chunks, rotate_absolute=False):
    """Feed q/k/v through ``cache`` in the given chunk sizes (rotated at absolute positions first if asked)."""
    if rotate_absolute:
        pos = torch.arange(q.shape[2])
        q, k = apply_rope(q, MODEL.rope_cos[pos], MODEL.rope_sin[pos]), apply_rope(k, MODEL.rope_cos[pos],
                                                                                  MODEL.rope_sin[pos])
    outs, start = [], 0
    for n in chunks:
        outs.append(cache.attend(0, q[:, :, start:start + n], k[:, :, start:start + n], v[:, :, start:start + n]))
        start += n
    return torch.cat(outs, 2)


def qkv(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, 4, n, 32, generator=g), torch.randn(1, 2, n, 32, generator=g),
            torch.randn(1, 2, n, 32, generator=g))


@settings(max_examples=40)
@given(size=st.integers(1, 40), sinks=st.integers(0, 6), margin=st.integers(0, 8),
       chunks=st.lists(st.integers(1, 30), min_size=1, max_size=8), cache_positions=st.booleans())
def test_attention_equals_dense_over_the_kept_keys(size, sinks, margin, chunks, cache_positions):
    total = sum(chunks)
    q, k, v = qkv(total)
    cache = make_cache(f"window:size={size},sinks={sinks},margin={margin},"
                       f"positions={'cache' if cache_positions else 'absolute'}", MODEL)
    got = run(cache, q, k, v, chunks, rotate_absolute=not cache_positions)
    want = reference(q, k, v, size, sinks, cache_positions)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert cache.lengths[0] == total  # layer 0 fed


def test_without_eviction_the_model_is_exact_in_both_conventions():
    ids = [(7 * i) % 61 for i in range(90)]
    with torch.inference_mode():
        exact = MODEL(torch.tensor([ids]))[0]
        for spec in ("window:size=128,sinks=4", "window:size=128,positions=absolute"):
            cache = make_cache(spec, MODEL)
            got = torch.cat([MODEL(torch.tensor([ids[i:i + 16]]), cache=cache)[0] for i in range(0, 90, 16)])
            torch.testing.assert_close(got, exact, atol=1e-4, rtol=1e-4)


def test_gpt2_uses_absolute_positions(gpt2_dir):
    model = load_model(gpt2_dir)
    with pytest.raises(ValueError, match="learned positions"):
        make_cache("window:size=16,positions=cache", model)
    cache = make_cache("window:size=64,sinks=2", model)  # GPT-2's default: absolute
    assert not cache.rotates_keys
    ids = list(range(1, 40))
    with torch.inference_mode():
        torch.testing.assert_close(model(torch.tensor([ids]), cache=cache)[0], model(torch.tensor([ids]))[0],
                                   atol=1e-4, rtol=1e-4)


def test_crop_after_the_ring_wrapped():
    ids = [(5 * i + 3) % 61 for i in range(120)]
    cache = make_cache("window:size=16,sinks=4,margin=6", MODEL)
    with torch.inference_mode():
        first = torch.cat([MODEL(torch.tensor([[t]]), cache=cache)[0] for t in ids])
        cache.crop(114)  # 6 back: the evicted tokens the next window needs are in the margin
        again = torch.cat([MODEL(torch.tensor([[t]]), cache=cache)[0] for t in ids[114:]])
    torch.testing.assert_close(again, first[114:], atol=1e-5, rtol=1e-5)
    before = (cache.k.clone(), list(cache.lengths))
    with pytest.raises(ValueError, match="margin = 6"):
        cache.crop(100)
    assert torch.equal(cache.k, before[0]) and cache.lengths == before[1]  # refused: nothing changed


def test_memory_is_bounded_and_counted():
    cache = make_cache("window:size=32,sinks=4,margin=8", MODEL)
    assert cache.nbytes == 2 * 2 * 2 * (4 + 32 + 8) * 32 * 4  # K and V x layers x kv heads x slots x dim x fp32
    q, k, v = qkv(200)
    for layer in (0, 1):
        for i in range(200):
            cache.attend(layer, q[:, :, i:i + 1], k[:, :, i:i + 1], v[:, :, i:i + 1])
    assert len(cache) == 200 and cache.used_bytes == cache.nbytes


def test_generation_streams_past_the_context():
    model = tiny_llama(max_positions=64)
    ids = [3, 9, 27]
    with pytest.raises(ValueError, match="streams past it with a window cache that applies its own positions"):
        generate(model, ids, 100)
    with pytest.raises(ValueError, match="exceeds the model's maximum of 64"):
        generate(model, ids, 100, cache="window:size=16,positions=absolute")
    out = generate(model, ids, 150, cache="window:size=24,sinks=4", stop_token_ids=[])
    assert len(out) == 150
    long_prompt = [(i * 11) % 61 for i in range(130)]  # longer than the context, prefilled in one pass
    a = generate(model, long_prompt, 5, cache="window:size=24,sinks=4", stop_token_ids=[])
    cache = make_cache("window:size=24,sinks=4", model)
    with torch.inference_mode():
        for t in long_prompt:
            logits = model(torch.tensor([[t]]), cache=cache)[0, -1]
    assert a[0] == int(logits.argmax())  # one prefill == token by token


def test_spec_options():
    assert parse_spec("window:size=1024,sinks=4") == ("window", {"size": 1024, "sinks": 4})
    with pytest.raises(ValueError, match="expected one of cache, absolute"):
        parse_spec("window:positions=relative")
    with pytest.raises(ValueError, match="must be >= 1"):
        parse_spec("window:size=0")
    assert isinstance(make_cache("window", MODEL), WindowKVCache)


def test_speculative_decoding_over_a_wrapped_window():
    model = tiny_llama(max_positions=64)
    ids = [1, 2, 3, 4, 1, 2, 3, 4, 1, 2, 3]
    plain = generate(model, ids, 80, cache="window:size=20,sinks=2,margin=8", stop_token_ids=[])
    fast = generate(model, ids, 80, cache="window:size=20,sinks=2,margin=8", stop_token_ids=[],
                    speculative="prompt-lookup:k=4")
    assert fast == plain


def test_a_window_too_big_for_the_machine_is_refused_before_allocating():
    with pytest.raises((ValueError, MemoryError), match="needs .* GiB"):
        make_cache("window:size=2000000000", MODEL)
