"""LLM.chat: conversations through the chat template, answered by the engine like generate answers them."""

from __future__ import annotations

import pytest

from kvcache import LLM, SamplingParams
from kvcache.generation.generate import generate


def test_chat_matches_single_stream(real_model):
    llm = LLM(real_model, kv_memory="64MiB")
    conversations = [[{"role": "user", "content": "What is the capital of France?"}],
                     [{"role": "user", "content": "What is the capital of France?"},
                      {"role": "assistant", "content": "The capital of France is Paris."},
                      {"role": "user", "content": "And of Spain?"}]]
    outs = llm.chat(conversations, SamplingParams(max_new_tokens=16))
    tok = real_model.tokenizer
    for conversation, out in zip(conversations, outs):
        ids = tok.encode(tok.apply_chat_template(conversation))
        assert out.prompt_token_ids == ids
        assert out.outputs[0].token_ids == generate(real_model, ids, 16)
    assert "Paris" in outs[0].outputs[0].text and "Madrid" in outs[1].outputs[0].text
    assert llm.stats()["prefix_hit_tokens"] > 0  # the second conversation starts like the first
    single = llm.chat(conversations[0], SamplingParams(max_new_tokens=16))
    assert single[0].outputs[0].token_ids == outs[0].outputs[0].token_ids


def test_chat_errors(real_model, llama_dir):
    llm = LLM(real_model, kv_memory="16MiB")
    with pytest.raises(ValueError, match="conversation 0: .*role 'robot'"):
        llm.chat([{"role": "robot", "content": "beep"}])
    with pytest.raises(ValueError, match="no chat template"):
        LLM(str(llama_dir), kv_memory="4MiB").chat([{"role": "user", "content": "hi"}])
