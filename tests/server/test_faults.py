"""Fault cases under load: a request that raises inside the engine, clients dropping mid-stream, a burst of
invalid requests.  The server stays up, the other streams finish with exactly the offline result, and no
request or block is left behind."""

from __future__ import annotations

import concurrent.futures as cf

import httpx
import openai
import pytest

from kvcache.engine.llm import LLM
from kvcache.engine.sequence import SamplingParams
from served import NAME, Served, chat_model

POISON_SEED = 666  # the request whose tokens make the engine raise
PROMPTS = [f"def function_{i}(x):\n    " for i in range(6)]


@pytest.fixture(scope="module")
def faulty():
    llm = LLM(chat_model(), kv_memory="64MiB", max_num_seqs=64)
    emit = llm.stop_rules.emit

    def emit_or_raise(seq, token):
        if seq.request.params.seed == POISON_SEED and seq.num_output >= 3:
            raise RuntimeError("injected fault")
        return emit(seq, token)

    llm.stop_rules.emit = emit_or_raise
    s = Served(llm)
    yield s
    s.close()


@pytest.fixture(scope="module")
def want():
    outs = LLM(chat_model(), kv_memory="64MiB").generate(PROMPTS, SamplingParams(max_new_tokens=48, ignore_eos=True))
    return [o.text for o in outs]


def stream_text(client, prompt, **kw) -> str:
    chunks = client.completions.create(model=NAME, prompt=prompt, max_tokens=48, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True}, **kw)
    return "".join(c.choices[0].text for c in chunks if c.choices)


def test_a_request_that_raises_fails_alone(faulty, want):
    client = faulty.client()
    with cf.ThreadPoolExecutor(8) as pool:
        good = [pool.submit(stream_text, client, p) for p in PROMPTS]
        bad_stream = pool.submit(stream_text, client, PROMPTS[0], seed=POISON_SEED)
        bad_plain = pool.submit(faulty.http.post, "/v1/completions",
                                json={"prompt": "x", "max_tokens": 20, "seed": POISON_SEED, "ignore_eos": True})
        assert [f.result() for f in good] == want
        with pytest.raises(openai.APIError, match="injected fault"):
            bad_stream.result()
        response = bad_plain.result()
    assert response.status_code == 500 and "injected fault" in response.json()["error"]["message"]
    assert faulty.http.get("/health").json() == {"status": "ok"}
    state = faulty.wait_idle()
    assert state["requests_held"] == 0 and state["kv_blocks_in_use"] == 0
    metrics = faulty.http.get("/metrics").text
    assert f'kvcache:request_errors_total{{model_name="{NAME}"}} 2.0' in metrics


def drop_after(url, prompt, lines):
    with httpx.Client(base_url=url, timeout=60) as http:
        with http.stream("POST", "/v1/completions", json={"prompt": prompt, "max_tokens": 300, "stream": True,
                                                          "ignore_eos": True, "temperature": 0}) as r:
            for _, _ in zip(range(lines), r.iter_lines()):
                pass


def test_drops_and_invalid_bursts_during_load(faulty, want):
    client = faulty.client()
    bad = [{"prompt": "x", "max_tokens": -1}, {"prompt": 3}, {"model": "other", "prompt": "x"},
           {"prompt": "x", "n": 10_000}, {"prompt": "x", "top_k": "2"}]
    with cf.ThreadPoolExecutor(16) as pool:
        good = [pool.submit(stream_text, client, p) for p in PROMPTS]
        drops = [pool.submit(drop_after, faulty.url, p, 3 + i) for i, p in enumerate(PROMPTS)]
        invalid = [pool.submit(faulty.http.post, "/v1/completions", json=bad[i % len(bad)]) for i in range(40)]
        assert [f.result() for f in good] == want
        for f in drops:
            f.result()
        assert all(400 <= f.result().status_code < 500 for f in invalid)
    state = faulty.wait_idle()
    assert state["requests_held"] == 0 and state["kv_blocks_in_use"] == 0
