"""Beyond capacity: requests queue and all finish; cache salts keep KV apart; the real model answers chat
through the server exactly as ``LLM.chat`` does (its end-of-turn token's text left out)."""

from __future__ import annotations

import concurrent.futures as cf
import time

import pytest

from kvcache.engine.llm import LLM
from kvcache.engine.sequence import SamplingParams
from served import NAME, Served, chat_model

PROMPTS = [f"def task_{i}(items):\n    " for i in range(6)]


@pytest.fixture(scope="module")
def small():
    s = Served(LLM(chat_model(), num_blocks=12, block_size=16))  # room for about two of these at once
    yield s
    s.close()


def test_requests_beyond_capacity_queue_and_finish(small):
    want = LLM(chat_model(), kv_memory="16MiB").generate(PROMPTS, SamplingParams(max_new_tokens=80, ignore_eos=True))
    client, waiting = small.client(), 0

    def complete(prompt):
        return client.completions.create(model=NAME, prompt=prompt, max_tokens=80, temperature=0,
                                         extra_body={"ignore_eos": True}).choices[0].text

    with cf.ThreadPoolExecutor(len(PROMPTS)) as pool:
        futures = [pool.submit(complete, p) for p in PROMPTS]
        while not all(f.done() for f in futures):
            waiting = max(waiting, small.state()["requests_waiting"])
            time.sleep(0.01)
        assert [f.result() for f in futures] == [o.text for o in want]
    assert waiting > 0  # some had to wait for blocks
    state = small.wait_idle()
    assert state["kv_blocks_in_use"] == 0 and state["requests_held"] == 0


def test_a_full_queue_refuses_with_429_and_retry_after():
    """With one batch slot and one waiting place, a flood gets 429s at once; the two it took finish exactly."""
    llm = LLM(chat_model(), kv_memory="16MiB", max_num_seqs=1)
    step = llm.step
    llm.step = lambda: (time.sleep(0.005), step())[1]  # slow enough that the flood arrives during the first
    s = Served(llm, max_waiting=1)
    try:
        body = {"model": NAME, "max_tokens": 40, "temperature": 0, "ignore_eos": True}
        with cf.ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda p: s.http.post("/v1/completions", json={**body, "prompt": p}), PROMPTS))
        refused = [r for r in answers if r.status_code == 429]
        assert refused and all(r.headers["retry-after"] == "1" for r in refused)
        assert all(r.json()["error"]["code"] == "overloaded" and "waiting" in r.json()["error"]["message"]
                   for r in refused)
        want = LLM(chat_model(), kv_memory="16MiB").generate(PROMPTS, SamplingParams(max_new_tokens=40,
                                                                                    ignore_eos=True))
        taken = [(r, w) for r, w in zip(answers, want) if r.status_code == 200]
        assert len(taken) >= 2 and all(r.json()["choices"][0]["text"] == w.outputs[0].text for r, w in taken)
        assert len(taken) + len(refused) == len(PROMPTS)
        assert s.wait_idle()["requests_held"] == 0
    finally:
        s.close()


def test_a_request_bigger_than_the_pool_is_refused(small):
    r = small.http.post("/v1/completions", json={"prompt": "x", "max_tokens": 300})
    assert r.status_code == 400 and r.json()["error"]["code"] == "kv_capacity_exceeded"
    assert "192" in r.json()["error"]["message"]  # the pool's 12 x 16 tokens, named


def test_cache_salt_keeps_tenants_apart(served):
    client = served.client()
    prompt = "# tenant data shared by prompt text only, long enough for two blocks of KV\n" * 3

    def cached(salt):
        r = client.completions.create(model=NAME, prompt=prompt, max_tokens=2, temperature=0,
                                      extra_body={"cache_salt": salt} if salt else None)
        return r.usage.prompt_tokens_details.cached_tokens

    assert cached("alice") == 0
    assert cached("alice") > 0  # the same tenant reuses its KV
    assert cached("bob") == 0  # another tenant never sees it
    assert cached(None) == 0


def test_the_real_model_chats_through_the_server(real_model):
    s = Served(LLM(real_model, kv_memory="128MiB"), name="smollm2-135m")
    try:
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        want = LLM(real_model, kv_memory="128MiB").chat(messages, SamplingParams(max_new_tokens=32))[0].outputs[0]
        r = s.client().chat.completions.create(model="smollm2-135m", messages=messages, max_tokens=32,
                                               temperature=0)
        assert r.choices[0].message.content == want.text and "Paris" in want.text
        assert "<|im_end|>" not in want.text and r.choices[0].finish_reason == "stop"
        chunks = s.client().chat.completions.create(model="smollm2-135m", messages=messages, max_tokens=32,
                                                    temperature=0, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
    finally:
        s.close()
