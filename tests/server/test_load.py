"""A bounded load test on loopback: 32 concurrent streaming chat clients with mixed lengths and a shared
system prompt.  Every answer equals the offline result, the shared prompt is served from the prefix cache,
and no request or block is left when they are done.  (The throughput numbers: ``kvcache bench serve``.)"""

from __future__ import annotations

import asyncio

from kvcache.bench.server_load import run_clients, workload
from kvcache.engine.llm import LLM
from kvcache.engine.sequence import SamplingParams
from served import NAME


def test_32_streaming_clients_get_the_offline_answers(served):
    jobs = workload(32, lengths=(8, 24, 40, 64))
    offline = LLM(served.llm.model, kv_memory="64MiB").chat(
        [j.messages for j in jobs], [SamplingParams(max_new_tokens=j.max_tokens, ignore_eos=True) for j in jobs])
    results = asyncio.run(asyncio.wait_for(run_clients(served.url, jobs, NAME), timeout=300))
    assert [r["text"] for r in results] == [o.text for o in offline]
    assert [r["tokens"] for r in results] == [j.max_tokens for j in jobs]
    assert sum(r["cached"] for r in results) > 0  # the shared system prompt came from the prefix cache
    state = served.wait_idle()
    assert state["requests_held"] == 0 and state["kv_blocks_in_use"] == 0
