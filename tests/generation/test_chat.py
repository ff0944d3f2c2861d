"""Multi-turn chat: a turn prefills only what the cache does not hold, and the result is exactly what a
fresh, uncached run of the whole conversation gives."""

from __future__ import annotations

import pytest
import torch

from kvcache.caches.contiguous import ContiguousKVCache
from kvcache.generation.chat import ChatSession
from kvcache.generation.generate import generate
from kvcache.model.loader import load_model


def test_generate_continues_a_given_cache(model_dir):
    """A cache holding the KV of a prompt prefix: same tokens as a fresh run, only the rest is prefilled."""
    model = load_model(model_dir)
    prompt = [1, 5, 9, 20, 3, 7, 11, 2, 64, 33, 33, 80, 14]
    fresh = generate(model, prompt, 12, stop_token_ids=[])
    cache = ContiguousKVCache.for_model(model, capacity=8)
    with torch.inference_mode():
        model(torch.tensor([prompt[:9]]), cache=cache)
    assert generate(model, prompt, 12, stop_token_ids=[], cache=cache) == fresh
    assert len(cache) == len(prompt) + 11  # everything but the last token, grown past the capacity
    assert generate(model, prompt, 12, stop_token_ids=[], use_cache=False) == fresh


def test_generate_refuses_a_cache_that_cannot_fit(model_dir):
    model = load_model(model_dir)
    cache = ContiguousKVCache.for_model(model, capacity=8)
    with torch.inference_mode():
        model(torch.tensor([[1, 2, 3]]), cache=cache)
    with pytest.raises(ValueError, match="at least the last prompt token must be new"):
        generate(model, [1, 2, 3], 4, cache=cache)
    with pytest.raises(ValueError, match="use_cache=False"):
        generate(model, [1, 2, 3, 4], 4, cache=cache, use_cache=False)
    with pytest.raises(ValueError, match="does not fit this model"):
        generate(model, [1, 2, 3, 4], 4, cache=ContiguousKVCache(1, 1, 4))
    assert len(cache) == 3


QUESTIONS = ["What is the capital of France?", "And of Germany?", "Name three colours."]


def test_turns_reuse_the_cache_and_stay_exact(real_model):
    session = ChatSession(real_model, max_new_tokens=24)
    tok = real_model.tokenizer
    for turn, question in enumerate(QUESTIONS):
        reply = "".join(session.send(question))
        stats = session.last
        ids = tok.encode(tok.apply_chat_template(session.messages[:-1]))
        expected = generate(real_model, ids, 24, use_cache=False)  # the dense reference, from scratch
        assert reply == tok.decode([t for t in expected if t not in tok.eos_token_ids])
        assert stats.prompt_tokens == len(ids)
        if turn == 0:
            assert stats.prefilled_tokens == len(ids)
        else:  # only the new messages (and at most the re-tokenized end of the last reply) are computed
            assert stats.reused_tokens > 0.6 * stats.prompt_tokens
    assert "Paris" in session.messages[1]["content"]
    session.reset()
    assert session.messages == [] and len(session.cache) == 0


def test_interrupted_reply_keeps_the_conversation_consistent(real_model):
    session = ChatSession(real_model, max_new_tokens=32)
    pieces = session.send("Tell me about the sea.")
    next(pieces)
    next(pieces)
    pieces.close()  # the caller stops reading (Ctrl-C in the terminal)
    assert session.messages[-1]["role"] == "assistant"
    assert len(session.cached_ids) == len(session.cache)
    reply = "".join(session.send("Thanks."))
    assert reply and session.last.reused_tokens > 0


def test_a_model_without_a_template_is_refused(model_dir):
    with pytest.raises(ValueError, match="no chat template"):
        ChatSession(load_model(model_dir))


def test_a_session_with_a_quantized_cache(real_model):
    """The whole conversation in one int8 cache: turns go on, the cache holds codes and stays small."""
    session = ChatSession(real_model, max_new_tokens=16, kv_cache="int8:residual=16")
    for question in QUESTIONS[:2]:
        assert "".join(session.send(question)).strip()
    assert session.last.reused_tokens > 0
    assert type(session.cache).__name__ == "QuantizedKVCache" and session.cache.qcounts[0] > 0
    with pytest.raises(ValueError, match="unknown cache"):
        ChatSession(real_model, kv_cache="int2")
