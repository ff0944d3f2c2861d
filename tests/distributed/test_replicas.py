"""Two engine replicas on Ray Serve behind the prefix-aware router, through the official ``openai`` client:
greedy results equal ``LLM.generate`` (streaming and not), requests with a shared prefix go where it is cached,
the page and /metrics show both pools, errors have the single server's bodies, and a replica killed under load
fails only its own requests (clearly) and is replaced."""

from __future__ import annotations

import os
import signal
import subprocess
import threading

import httpx
import pytest

from replicas import NAME, chat_model_dir, client, deploy, metric, replicas, require_ray, wait_for

require_ray()

from kvcache.engine.llm import LLM  # noqa: E402
from kvcache.engine.sequence import SamplingParams  # noqa: E402
from kvcache.model.loader import load_model  # noqa: E402

pytestmark = pytest.mark.timeout(300)
PROMPTS = ["def fibonacci(n):", "import os\nimport sys\n", "class Stack:\n    def push(self, item):"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return chat_model_dir(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def url(model_dir):
    from kvcache.distributed import shutdown

    base = deploy(model_dir)
    yield base
    shutdown()


@pytest.fixture(scope="module")
def offline(model_dir):
    return LLM(load_model(model_dir), kv_memory="16MiB")


def greedy(offline, prompt, max_tokens):
    return offline.generate([prompt], SamplingParams(max_new_tokens=max_tokens, temperature=0))[0].outputs[0]


def test_completions_and_chat_equal_the_engine_streaming_and_not(url, offline):
    c = client(url)
    for prompt in PROMPTS:
        want = greedy(offline, prompt, 24)
        r = c.completions.create(model=NAME, prompt=prompt, max_tokens=24, temperature=0)
        assert r.choices[0].text == want.text and r.choices[0].finish_reason == want.finish_reason
        assert r.usage.completion_tokens == len(want.token_ids)
        chunks = list(c.completions.create(model=NAME, prompt=prompt, max_tokens=24, temperature=0, stream=True,
                                           stream_options={"include_usage": True}))
        assert "".join(x.choices[0].text for x in chunks if x.choices) == want.text
        assert chunks[-1].usage.completion_tokens == len(want.token_ids)
    messages = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "def add(a, b):"}]
    want = offline.chat(messages, SamplingParams(max_new_tokens=20, temperature=0))[0].outputs[0].text
    r = c.chat.completions.create(model=NAME, messages=messages, max_tokens=20, temperature=0)
    assert r.choices[0].message.content == want
    stream = c.chat.completions.create(model=NAME, messages=messages, max_tokens=20, temperature=0, stream=True)
    assert "".join(x.choices[0].delta.content or "" for x in stream if x.choices) == want
    several = c.completions.create(model=NAME, prompt=PROMPTS, max_tokens=12, temperature=0, n=2)
    texts = [x.text for x in sorted(several.choices, key=lambda x: x.index)]
    assert texts == [t for p in PROMPTS for t in [greedy(offline, p, 12).text] * 2]


def test_a_shared_prefix_goes_where_it_is_cached(url):
    def prefix(topic):
        return "".join(f"# {topic} rule {i}: keep functions short and names clear.\n" for i in range(12))

    before = metric(url, "kvcache:router_requests_total", reason="prefix")
    placed = metric(url, "kvcache:router_requests_total")
    http = httpx.Client(timeout=120)
    for turn in range(4):
        for topic in ("parsing", "testing"):
            body = {"model": NAME, "prompt": prefix(topic) + f"def step_{turn}():", "max_tokens": 4, "temperature": 0}
            r = http.post(url + "/v1/completions", json=body)
            assert r.status_code == 200, r.text
            if turn:  # the replica that served this prefix had it in its pool
                assert r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] >= 160
    after = metric(url, "kvcache:router_requests_total", reason="prefix")
    assert sum(after.values()) - sum(before.values()) == 6  # every repeat was routed by its prefix
    by_replica = metric(url, "kvcache:router_requests_total")
    assert sorted(by_replica[r] - placed.get(r, 0) for r in by_replica) == [4, 4]  # one prefix on each replica


def test_errors_have_the_single_servers_bodies(url):
    http = httpx.Client(base_url=url, timeout=60)
    r = http.post("/v1/completions", json={"model": NAME, "prompt": "x", "temperature": 5})
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"
    r = http.post("/v1/completions", json={"model": "nope", "prompt": "x"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = http.post("/v1/completions", json={"model": NAME, "prompt": "x " * 400, "max_tokens": 400})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    r = http.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert http.get("/v1/models").json()["data"][0]["id"] == NAME
    assert http.post("/tokenize", json={"prompt": "def f():"}).json()["count"] > 0


def test_the_state_page_and_metrics_show_every_replica(url):
    pools = wait_for(lambda: len(replicas(url)) == 2 and replicas(url), 30, "both replicas on the board")
    assert len({p["replica"] for p in pools}) == 2 and all(set(p["blocks"]) <= set("ucf") for p in pools)
    state = httpx.get(url + "/engine/state", timeout=30).json()
    assert state["blocks"] == "".join(p["blocks"] for p in state["replicas"])  # one read: pools change between two
    assert {p["replica"] for p in state["replicas"]} == {p["replica"] for p in pools}
    assert state["model"] == NAME and state["chat"]
    assert "<canvas" in httpx.get(url + "/", timeout=30).text
    assert httpx.get(url + "/health", timeout=30).json() == {"status": "ok", "replicas": 2}
    generated = metric(url, "kvcache:generation_tokens_total")
    assert len(generated) == 2 and all(v > 0 for v in generated.values())
    assert set(metric(url, "kvcache:kv_cache_usage_perc")) == {p["replica"] for p in pools}


def test_the_page_draws_every_replicas_pool(url, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(url + "/")
    WebDriverWait(browser, 30).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#replicas .replica")) == 2)
    pools = {p["replica"]: p for p in replicas(url)}
    drawn = browser.find_elements(By.CSS_SELECTOR, "#replicas .replica")
    assert {d.get_attribute("data-replica") for d in drawn} == set(pools)
    for d in drawn:
        canvas, pool = d.find_element(By.TAG_NAME, "canvas"), pools[d.get_attribute("data-replica")]
        counts = [int(canvas.get_attribute(f"data-{k}")) for k in ("in-use", "cached", "free")]
        assert sum(counts) == len(pool["blocks"]) and counts[1] > 0  # each pool kept the prompts it served
        assert d.find_element(By.TAG_NAME, "p").text.startswith(f"replica {d.get_attribute('data-replica')}:")
    assert not browser.find_element(By.ID, "blocks").is_displayed()  # one grid per replica, not one for all


def test_serve_status_shows_the_deployments(url):
    out = subprocess.run(["serve", "status"], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "RAY_ADDRESS": ""})
    if out.returncode != 0 and "dashboard" in (out.stderr + out.stdout).lower():
        pytest.skip("Ray's dashboard is not running here: " + out.stderr[-200:])
    assert out.returncode == 0, out.stderr
    assert "KVEngine" in out.stdout and "KVIngress" in out.stdout and "RUNNING" in out.stdout


def test_a_killed_replica_fails_only_its_requests_and_is_replaced(url, offline):
    """Last in the module: it kills a replica.  Every request completes with the right text or gets a clear
    error; the load finishes; the replacement takes new traffic."""
    prompts = [f"def task_{i}(items):\n    # step {i}\n" for i in range(16)]
    want = {p: greedy(offline, p, 48).text for p in prompts}
    results, errors = {}, {}
    before = replicas(url)
    victim, before_ids = before[0], {r["replica"] for r in before}

    def one(i, prompt):
        body = {"model": NAME, "prompt": prompt, "max_tokens": 48, "temperature": 0, "stream": i % 2 == 0}
        try:
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
                raw = r.read().decode()
            results[prompt] = (r.status_code, raw)
        except Exception as exc:  # the test reports it below
            errors[prompt] = repr(exc)

    threads = [threading.Thread(target=one, args=(i, p)) for i, p in enumerate(prompts)]
    for t in threads[:8]:
        t.start()
    wait_for(lambda: sum(r["requests_running"] + r["requests_waiting"] for r in replicas(url)) > 0, 30, "load")
    os.kill(victim["pid"], signal.SIGKILL)
    for t in threads[8:]:
        t.start()
    for t in threads:
        t.join(timeout=180)
    assert not any(t.is_alive() for t in threads), "a request hung"
    assert not errors, errors
    completed = 0
    for prompt, (status, raw) in results.items():
        if status == 200 and '"error"' not in raw:
            texts = _texts(raw)
            assert texts == want[prompt], (prompt, raw[:300])
            completed += 1
        else:  # a clear 5xx body or error event naming the failed replica
            assert status >= 500 or '"error"' in raw, (status, raw[:300])
            assert "replica" in raw or "engine" in raw, raw[:300]
    assert completed >= 8  # the other replica's requests (and the resent ones) all completed
    new = wait_for(lambda: (lambda ids: len(ids) == 2 and victim["replica"] not in ids and ids)(
        {r["replica"] for r in replicas(url)}), 120, "the replacement replica")
    for i in range(6):  # new prefixes go to the replica holding the fewest: the replacement
        r = httpx.post(url + "/v1/completions", json={"model": NAME, "prompt": f"# fresh {i}\n" * 20,
                                                      "max_tokens": 2}, timeout=120)
        assert r.status_code == 200, r.text
    (replacement,) = new - before_ids
    wait_for(lambda: metric(url, "kvcache:generation_tokens_total").get(replacement, 0) > 0, 10,
             "the replacement's tokens in /metrics")  # replicas post every half second


def _texts(raw: str) -> str:
    import json

    if not raw.startswith("data: "):
        return json.loads(raw)["choices"][0]["text"]
    parts = []
    for line in raw.splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            chunk = json.loads(line[6:])
            parts += [c["text"] for c in chunk.get("choices", [])]
    return "".join(parts)
