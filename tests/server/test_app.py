"""The server as clients use it: the official ``openai`` client against a live server on loopback.

Greedy results equal ``LLM.generate`` on the same prompts; streams concatenate to the non-streamed
result; every bad request gets a 4xx with OpenAI's error body and the server goes on serving."""

from __future__ import annotations

import json

import httpx
import pytest

from kvcache.engine.llm import LLM
from kvcache.engine.sequence import SamplingParams
from served import NAME, chat_model

PROMPTS = ["def fibonacci(n):", "import os\nimport sys\n", "class Stack:\n    def push(self, item):"]


@pytest.fixture(scope="module")
def offline():
    return LLM(chat_model(), kv_memory="64MiB")


def greedy_text(offline, prompts, max_tokens, **kw):
    outs = offline.generate(prompts, SamplingParams(max_new_tokens=max_tokens, **kw))
    return [o.outputs[0] for o in outs]


def test_completions_greedy_equal_the_engine(served, offline):
    client = served.client()
    want = greedy_text(offline, PROMPTS, 24)
    for prompt, w in zip(PROMPTS, want):
        r = client.completions.create(model=NAME, prompt=prompt, max_tokens=24, temperature=0)
        assert r.choices[0].text == w.text and r.choices[0].finish_reason == w.finish_reason
        assert r.usage.completion_tokens == len(w.token_ids)
        assert r.usage.prompt_tokens == len(offline.tokenizer.encode(prompt))
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
        assert r.model == NAME and r.object == "text_completion" and r.id.startswith("cmpl-")
    several = client.completions.create(model=NAME, prompt=PROMPTS, max_tokens=24, temperature=0)
    assert [c.text for c in sorted(several.choices, key=lambda c: c.index)] == [w.text for w in want]
    ids = offline.tokenizer.encode(PROMPTS[0])
    by_ids = client.completions.create(model=NAME, prompt=ids, max_tokens=24, temperature=0)
    assert by_ids.choices[0].text == want[0].text


def test_streaming_concatenates_to_the_result_and_ends_like_openai(served, offline):
    client = served.client()
    want = greedy_text(offline, PROMPTS[:1], 40)[0]
    chunks = list(client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=40, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    text_chunks = [c for c in chunks if c.choices]
    assert len(text_chunks) > 5  # incremental, not one block at the end
    assert "".join(c.choices[0].text for c in text_chunks) == want.text
    assert [c.choices[0].finish_reason for c in text_chunks][-1] == want.finish_reason
    assert all(c.choices[0].finish_reason is None for c in text_chunks[:-1])
    usage = chunks[-1]
    assert usage.choices == [] and usage.usage.completion_tokens == len(want.token_ids)
    assert usage.usage.prompt_tokens_details.cached_tokens == 0  # a prompt shorter than a block: nothing cached


def test_raw_sse_framing(served):
    with served.http.stream("POST", "/v1/completions", json={"prompt": "x = ", "max_tokens": 5, "stream": True,
                                                           "temperature": 0}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    bodies = [json.loads(e[6:]) for e in events[:-1]]
    assert bodies[-1]["choices"][0]["finish_reason"] == "length"


def test_cached_tokens_from_the_prefix_cache(served):
    client = served.client()
    prompt = "# a shared header that spans several KV blocks of sixteen tokens each\n" * 4 + "def f():"
    first = client.completions.create(model=NAME, prompt=prompt, max_tokens=4, temperature=0)
    second = client.completions.create(model=NAME, prompt=prompt, max_tokens=4, temperature=0)
    n = first.usage.prompt_tokens
    assert second.usage.prompt_tokens_details.cached_tokens == (n - 1) // 16 * 16 > 0
    assert second.choices[0].text == first.choices[0].text


def test_n_seed_and_stop(served, offline):
    client = served.client()
    a = client.completions.create(model=NAME, prompt=PROMPTS[1], max_tokens=16, temperature=0.9, n=3, seed=7)
    b = client.completions.create(model=NAME, prompt=PROMPTS[1], max_tokens=16, temperature=0.9, n=3, seed=7)
    assert sorted(c.index for c in a.choices) == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # seeded: reproducible
    assert len({c.text for c in a.choices}) > 1  # and the completions differ from each other
    want = offline.generate(PROMPTS[1], SamplingParams(max_new_tokens=16, temperature=0.9, n=3, seed=7))[0]
    assert [c.text for c in a.choices] == [c.text for c in want.outputs]
    full = greedy_text(offline, PROMPTS[:1], 40)[0].text
    stop = full.strip()[4:7]
    r = client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=40, temperature=0, stop=[stop])
    assert r.choices[0].text == full[:full.find(stop)] and r.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=40, temperature=0, stop=stop,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == r.choices[0].text


def test_echo(served, offline):
    r = served.client().completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=8, temperature=0, echo=True)
    assert r.choices[0].text == PROMPTS[0] + greedy_text(offline, PROMPTS[:1], 8)[0].text


def test_chat_streams_role_then_content(served, offline):
    client = served.client()
    messages = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "def add(a, b):"}]
    want = offline.chat(messages, SamplingParams(max_new_tokens=20))[0].outputs[0]
    r = client.chat.completions.create(model=NAME, messages=messages, max_tokens=20, temperature=0)
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == want.text
    assert r.object == "chat.completion" and r.choices[0].finish_reason == want.finish_reason
    chunks = list(client.chat.completions.create(model=NAME, messages=messages, max_tokens=20, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == want.finish_reason
    assert chunks[-1].usage.completion_tokens == len(want.token_ids)
    assert all(c.object == "chat.completion.chunk" for c in chunks)


def test_models_health_tokenize(served):
    client = served.client()
    assert [m.id for m in client.models.list()] == [NAME]
    assert served.http.get("/health").json() == {"status": "ok"}
    tok = served.http.post("/tokenize", json={"prompt": "def f(x):"}).json()
    assert tok["tokens"] == served.llm.tokenizer.encode("def f(x):") and tok["count"] == len(tok["tokens"])
    assert tok["max_model_len"] == served.llm.config.max_positions
    assert served.http.post("/detokenize", json={"tokens": tok["tokens"]}).json() == {"prompt": "def f(x):"}
    chat = served.http.post("/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat["tokens"] == served.llm.tokenizer.encode("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_metrics_count_what_happened(served):
    def scrape():
        text = served.http.get("/metrics").text
        return {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
                if line and not line.startswith("#")}

    before = scrape()
    served.client().completions.create(model=NAME, prompt="print(", max_tokens=6, temperature=0,
                                        extra_body={"ignore_eos": True})
    after = scrape()
    label = f'{{model_name="{NAME}"}}'
    assert after["kvcache:generation_tokens_total" + label] - before["kvcache:generation_tokens_total" + label] == 6
    for name in ["num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "prefix_cache_queries_total",
                 "prefix_cache_hits_total", "time_to_first_token_seconds_count", "e2e_request_latency_seconds_count",
                 "inter_token_latency_seconds_count", "kv_cache_bytes_reserved", "num_preemptions_total",
                 "prompt_tokens_total", "kv_cache_window_released_blocks_total"]:
        assert f"kvcache:{name}{label}" in after, name
    assert after["kvcache:kv_cache_bytes_reserved" + label] == served.llm.cache.nbytes
    assert any(k.startswith("kvcache:kv_cache_info{") for k in after)
    assert after[f'kvcache:request_success_total{{finished_reason="length",model_name="{NAME}"}}'] >= 1


BAD = [
    ({"prompt": "x", "max_tokens": "5"}, "max_tokens"),
    ({"prompt": "x", "temperature": 5}, "temperature"),
    ({"prompt": "x", "n": 0}, "n"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "", "max_tokens": 2}, "prompt"),
    ({"prompt": [], "max_tokens": 2}, "prompt"),
    ({"prompt": [1, 2, 10 ** 9]}, "prompt"),
    ({"prompt": "x", "logprobs": 2}, "logprobs"),
    ({"prompt": "x", "presence_penalty": 0.5}, "presence_penalty"),
    ({"prompt": "x", "stop": [""]}, None),
    ({"prompt": "x", "stream": "yes"}, "stream"),
    ({"max_tokens": 3}, "prompt"),
    ({"prompt": "x", "max_tokens": 100_000}, "max_tokens"),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
]


@pytest.mark.parametrize("body,param", BAD)
def test_bad_requests_get_openai_errors(served, body, param):
    r = served.http.post("/v1/completions", json=body)
    assert 400 <= r.status_code < 500, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param or param in error["message"]


def test_other_bad_requests(served):
    r = served.http.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = served.http.post("/v1/completions", json={"model": "gpt-9", "prompt": "x"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = served.http.post("/v1/chat/completions", json={"messages": [{"role": "wizard", "content": "x"}]})
    assert r.status_code == 400 and r.json()["error"]["param"].startswith("messages")
    r = served.http.post("/v1/chat/completions", json={"messages": []})
    assert r.status_code == 400
    long = {"messages": [{"role": "user", "content": "word " * 600}], "max_tokens": 4}
    r = served.http.post("/v1/chat/completions", json=long)
    assert r.status_code == 400 and "maximum context length is 512" in r.json()["error"]["message"]
    assert served.http.get("/v1/nothing").status_code == 404
    assert served.http.get("/v1/completions").status_code == 405
    assert served.client().completions.create(model=NAME, prompt="ok", max_tokens=2).choices  # still serving
    assert served.wait_idle()["requests_held"] == 0


def test_openai_client_raises_its_own_errors(served):
    import openai

    client = served.client()
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x")
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=NAME, prompt="x", max_tokens=10_000)
    assert "maximum context length" in str(info.value)


def test_a_client_that_disconnects_frees_its_blocks(served):
    body = {"prompt": "def long():\n", "max_tokens": 490, "temperature": 0, "ignore_eos": True, "stream": True}
    start = served.wait_idle()["generation_tokens"]
    with httpx.Client(base_url=served.url, timeout=60) as http:
        with http.stream("POST", "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            got = [next(lines) for _ in range(6)]
            assert got[0].startswith("data: ")
            assert served.state()["kv_blocks_in_use"] > 0
    state = served.wait_idle()
    assert state["requests_held"] == 0 and state["kv_blocks_in_use"] == 0
    assert state["generation_tokens"] - start < 490  # it stopped early: aborted, not run to the end
    start = state["generation_tokens"]
    body.pop("stream")
    with httpx.Client(base_url=served.url, timeout=0.15) as http:  # a non-streaming client that gives up
        with pytest.raises(httpx.ReadTimeout):
            http.post("/v1/completions", json=body)
    state = served.wait_idle()
    assert state["requests_held"] == 0 and state["kv_blocks_in_use"] == 0
    assert state["generation_tokens"] - start < 490
