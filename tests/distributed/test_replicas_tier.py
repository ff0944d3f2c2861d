"""Replicas sharing the Redis KV tier, with routing forced to round-robin: a prefix the first replica computed is
served to the second from Redis, with the same tokens.  And replicas with small queues refuse a flood with
429/503 and Retry-After instead of queueing it, while the requests they took complete correctly."""

from __future__ import annotations

import threading

import httpx
import pytest

from replicas import NAME, chat_model_dir, deploy, metric, require_ray, wait_for

require_ray()

from kvcache.engine.llm import LLM  # noqa: E402
from kvcache.engine.sequence import SamplingParams  # noqa: E402
from kvcache.model.loader import load_model  # noqa: E402

pytestmark = pytest.mark.timeout(300)
PREFIX = "".join(f"# shared rule {i}: functions do one thing, and names say what.\n" for i in range(10))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from kvcache.distributed import shutdown
    from redis_server import RedisServer, require_redis_server

    require_redis_server()
    redis = RedisServer(tmp_path_factory.mktemp("redis")).start()
    try:  # the redis-server stops even if the replicas never came up
        model_dir = chat_model_dir(tmp_path_factory.mktemp("model"))
        url = deploy(model_dir, router="round-robin", kv_store=redis.url, kv_chunk=32, max_num_seqs=2,
                     max_waiting=2)
        yield url, redis, model_dir
        shutdown()
    finally:
        redis.stop()


def test_the_second_replica_reads_the_first_ones_prefix_from_redis(setup):
    url, redis, model_dir = setup
    want = LLM(load_model(model_dir), kv_memory="16MiB").generate(
        [PREFIX + "def a():"], SamplingParams(max_new_tokens=16, temperature=0))[0].outputs[0].text
    placed = metric(url, "kvcache:router_requests_total")
    first = httpx.post(url + "/v1/completions", json={"model": NAME, "prompt": PREFIX + "def a():", "max_tokens": 16,
                                                      "temperature": 0}, timeout=120)
    assert first.status_code == 200 and first.json()["choices"][0]["text"] == want
    wait_for(lambda: sum(metric(url, "kvcache:kv_tier_saves_total", tier="redis").values()) >= 6, 30,
             "the first replica's chunks in Redis")
    second = httpx.post(url + "/v1/completions", json={"model": NAME, "prompt": PREFIX + "def a():",
                                                       "max_tokens": 16, "temperature": 0}, timeout=120)
    assert second.status_code == 200 and second.json()["choices"][0]["text"] == want
    routed = metric(url, "kvcache:router_requests_total")
    took = {r for r in routed if routed[r] > placed.get(r, 0)}
    assert len(took) == 2  # round-robin: one request on each replica
    hits = wait_for(lambda: {r: v for r, v in metric(url, "kvcache:kv_tier_hit_tokens_total", tier="redis").items()
                             if v > 0}, 10, "the tier hit in /metrics")
    assert len(hits) == 1 and next(iter(hits.values())) >= 192  # the second replica loaded 6+ chunks of 32
    saves = metric(url, "kvcache:kv_tier_saves_total", tier="redis")
    (reader,) = hits
    assert saves.get(reader, 0) < max(saves.values())  # the writer was the other replica
    assert redis.client().dbsize() >= 6


def test_a_flood_is_refused_with_retry_after_and_what_is_taken_completes(setup):
    url, _, model_dir = setup
    offline = LLM(load_model(model_dir), kv_memory="16MiB")
    prompts = [f"def flood_{i}(x):\n" for i in range(24)]
    want = {p: o.outputs[0].text for p, o in zip(prompts, offline.generate(
        prompts, SamplingParams(max_new_tokens=64, temperature=0, ignore_eos=True)))}
    answers = {}

    def one(prompt):
        r = httpx.post(url + "/v1/completions", json={"model": NAME, "prompt": prompt, "max_tokens": 64,
                                                      "temperature": 0, "ignore_eos": True}, timeout=120)
        answers[prompt] = r

    threads = [threading.Thread(target=one, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=200)
    assert len(answers) == len(prompts)
    refused = [r for r in answers.values() if r.status_code != 200]
    assert refused, "2 replicas x (2 running + 2 waiting) + 2 queued in the ingress took all 24 requests"
    for r in refused:
        assert r.status_code in (429, 503) and int(r.headers["retry-after"]) >= 1, (r.status_code, r.text)
        assert r.json()["error"]["code"] == "overloaded", r.text
    for prompt, r in answers.items():
        if r.status_code == 200:
            assert r.json()["choices"][0]["text"] == want[prompt]
    assert len(refused) < len(prompts) - 4
