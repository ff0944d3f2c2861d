"""The server's edges: every body the request schema accepts gets a 2xx or an OpenAI-style 4xx, never a 5xx
(a fuzzer built from the request models' JSON schema); explicit nulls mean the default; a chat longer than the
context is ``context_length_exceeded``; ``developer`` maps to ``system``; the gauges follow aborts on an idle
server; and a bf16 model with a quantized pool serves generate's tokens."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis_jsonschema import from_schema

from kvcache.engine.llm import LLM
from kvcache.generation.generate import generate
from kvcache.model.loader import load_model
from kvcache.server.protocol import ChatCompletionRequest, CompletionRequest
from served import CHATML, NAME, Served

CASES = {"sent": 0, "2xx": 0, "4xx": 0}
LIMITS = {"max_tokens": 4, "max_completion_tokens": 4, "n": 3}  # keep generated requests cheap


def cheap(body: dict) -> dict:
    """A generated body with its lengths capped (the fuzzer is after shapes and values, not long runs)."""
    for key, cap in LIMITS.items():
        if isinstance(body.get(key), int) and not isinstance(body.get(key), bool) and body[key] > cap:
            body[key] = cap
    if "max_tokens" not in body and "max_completion_tokens" not in body:
        body["max_tokens"] = 3  # chat's default is the rest of the context
    return body


def request_bodies(model) -> st.SearchStrategy[dict]:
    return from_schema(model.model_json_schema()).map(cheap)


def assert_openai_answer(response, body) -> None:
    CASES["sent"] += 1
    assert response.status_code < 500, (body, response.status_code, response.text[:300])
    if response.status_code >= 400:
        CASES["4xx"] += 1
        error = response.json()["error"]
        assert error["message"] and error["type"], (body, response.text)
    else:
        CASES["2xx"] += 1


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                                   HealthCheck.filter_too_much])
@given(body=request_bodies(CompletionRequest))
def test_every_completion_body_the_schema_accepts_gets_an_openai_answer(served, body):
    assert_openai_answer(served.http.post("/v1/completions", json=body), body)


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                                   HealthCheck.filter_too_much])
@given(body=request_bodies(ChatCompletionRequest))
def test_every_chat_body_the_schema_accepts_gets_an_openai_answer(served, body):
    assert_openai_answer(served.http.post("/v1/chat/completions", json=body), body)


def test_the_fuzzers_reached_the_engine():
    if not CASES["sent"]:
        pytest.skip("run with the fuzz tests")
    assert CASES["2xx"] >= 0.2 * CASES["sent"], CASES  # not only refusals


OPTIONAL = ["model", "temperature", "top_p", "top_k", "n", "seed", "stop", "stop_token_ids", "stream",
            "stream_options", "ignore_eos", "cache_salt", "presence_penalty", "frequency_penalty", "best_of", "user"]


@pytest.mark.parametrize("field", OPTIONAL + ["max_tokens", "echo", "logprobs", "suffix"])
def test_an_explicit_null_means_the_default_for_completions(served, field):
    r = served.http.post("/v1/completions", json={"prompt": "def f(", field: None, "temperature": 0}
                         if field != "temperature" else {"prompt": "def f(", field: None})
    assert r.status_code == 200, r.text
    if field == "max_tokens":  # OpenAI's default for completions
        assert r.json()["usage"]["completion_tokens"] <= 16


@pytest.mark.parametrize("field", OPTIONAL + ["max_tokens", "max_completion_tokens", "logprobs", "top_logprobs"])
def test_an_explicit_null_means_the_default_for_chat(served, field):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, field: None}
    assert served.http.post("/v1/chat/completions", json=body).status_code == 200


def test_a_chat_longer_than_the_context_names_the_limit(served):
    r = served.http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi " * 3000}]})
    error = r.json()["error"]
    assert r.status_code == 400 and error["code"] == "context_length_exceeded" and error["param"] == "messages"
    assert f"maximum context length is {served.llm.config.max_positions} tokens" in error["message"]


def test_developer_is_system_for_a_template_without_it(served):
    system = served.http.post("/tokenize", json={"messages": [{"role": "system", "content": "be terse"}]}).json()
    developer = served.http.post("/tokenize", json={"messages": [{"role": "developer", "content": "be terse"}]})
    assert developer.status_code == 200 and developer.json()["tokens"] == system["tokens"]
    r = served.http.post("/v1/chat/completions", json={"messages": [{"role": "developer", "content": "be terse"},
                                                                    {"role": "user", "content": "hi"}],
                                                       "max_tokens": 2})
    assert r.status_code == 200


def scrape(served) -> dict[str, float]:
    text = served.http.get("/metrics").text
    return {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
            if line and not line.startswith("#")}


def test_gauges_go_back_to_zero_after_client_aborts_on_an_idle_server(served):
    label = f'{{model_name="{NAME}"}}'
    for _ in range(2):
        with served.http.stream("POST", "/v1/completions", json={"prompt": "def f(", "max_tokens": 400,
                                                                 "stream": True, "ignore_eos": True}) as r:
            next(r.iter_lines())  # the first chunk: the request is running; then the client goes away
    assert served.wait_idle()["requests_held"] == 0
    deadline = time.monotonic() + 10
    while True:
        now = scrape(served)
        if now[f"kvcache:num_requests_running{label}"] == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert now[f"kvcache:num_requests_running{label}"] == 0
    assert now[f"kvcache:num_requests_waiting{label}"] == 0
    assert now[f"kvcache:kv_cache_bytes_in_use{label}"] == 0 and now[f"kvcache:kv_cache_usage_perc{label}"] == 0


@pytest.mark.parametrize("spec, dtype", [
    ("auto", torch.bfloat16), ("int8", torch.bfloat16), ("int4", torch.bfloat16), ("int4:keys=token", torch.bfloat16),
    ("auto", torch.float16), ("int8", torch.float16), ("int4", torch.float16),
])
def test_a_half_precision_model_serves_generates_tokens_through_every_pool(spec, dtype):
    model = load_model(dtype=dtype)
    model.tokenizer.chat_template = CHATML
    served = Served(LLM(model, kv_memory="32MiB", kv_cache=spec))
    shared = "import os\nimport sys\nimport json\nimport time\n\n\ndef main(argv):\n    " * 2  # blocks: hits
    prompts = ["def fibonacci(n):", shared + "parser = ", "class Stack:\n    def", shared + "parser = "]

    def ask(prompt):
        return served.http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 24, "temperature": 0,
                                                         "ignore_eos": True}).json()

    try:
        with ThreadPoolExecutor(len(prompts)) as pool:  # sent together: they share engine steps
            bodies = list(pool.map(ask, prompts))
        bodies.append(ask(shared + "parser = "))  # after the others finished: served from the prefix cache
        assert bodies[-1]["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
        for prompt, body in zip([*prompts, shared + "parser = "], bodies):
            want = generate(model, model.tokenizer.encode(prompt), 24, cache=served.llm.kv_cache_spec,
                            stop_token_ids=[])
            assert body["choices"][0]["text"] == model.tokenizer.decode(want), (spec, dtype, prompt)
    finally:
        served.close()
