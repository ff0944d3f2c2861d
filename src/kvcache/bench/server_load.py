"""``kvcache bench serve``: many concurrent streaming chat clients against ``kvcache serve``, and the same
workload through ``LLM.generate`` in the same process, alternating.  Prints aggregate tokens/s of both, their
ratio, and time to first token as the clients saw it (p50/p99).

The workload: ``clients`` conversations sharing one system prompt (so the prefix cache is exercised), each
with its own question and a mixed completion length, greedy with ``ignore_eos`` so both paths produce the
same tokens.  The clients run in a child process (their HTTP and JSON work does not share the server's
interpreter lock) and check nothing; the load test in tests/server/ checks every answer.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import statistics
import time
from dataclasses import dataclass

from ..engine.llm import LLM
from ..engine.sequence import SamplingParams
from .common import percentile, table

SYSTEM = ("You are a careful assistant for a team of Python developers. Answer in plain English, keep answers "
          "short, prefer the standard library, and show code only when it helps. ") * 3
TOPICS = ["list comprehensions", "the GIL", "context managers", "dataclasses", "asyncio", "decorators", "type hints",
          "generators", "f-strings", "pathlib", "logging", "unit tests", "virtual environments", "exceptions",
          "dictionaries", "sets", "slicing", "closures", "itertools", "functools", "pickle", "json", "regular "
          "expressions", "threads", "processes", "sockets", "the walrus operator", "enumerate", "zip", "sorting",
          "lambda functions", "modules"]
LENGTHS = (16, 48, 96, 160)


@dataclass
class Job:
    messages: list[dict]
    max_tokens: int


def workload(clients: int = 32, lengths: tuple[int, ...] = LENGTHS) -> list[Job]:
    return [Job([{"role": "system", "content": SYSTEM},
                 {"role": "user", "content": f"In two sentences, what should I know about {TOPICS[i % len(TOPICS)]}?"}],
                lengths[i % len(lengths)]) for i in range(clients)]


def body(job: Job, model: str) -> dict:
    return {"model": model, "messages": job.messages, "max_tokens": job.max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}


async def stream_chat(http, url: str, payload: dict) -> dict:
    """One streaming client: its text, token count, and when its first and last pieces arrived."""
    start, first, text, usage = time.perf_counter(), None, [], None
    async with http.stream("POST", url + "/v1/chat/completions", json=payload) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread()).decode()[:300]}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            for choice in chunk["choices"]:
                piece = choice["delta"].get("content")
                if piece:
                    first = first or time.perf_counter()
                    text.append(piece)
            usage = chunk.get("usage") or usage
    return {"text": "".join(text), "tokens": usage["completion_tokens"], "cached": usage["prompt_tokens_details"][
        "cached_tokens"], "start": start, "ttft": (first or time.perf_counter()) - start, "end": time.perf_counter()}


async def run_clients(url: str, jobs: list[Job], model: str) -> list[dict]:
    """All clients at once; results in job order."""
    import httpx

    limits = httpx.Limits(max_connections=len(jobs) + 4, max_keepalive_connections=len(jobs) + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        return await asyncio.gather(*(stream_chat(http, url, body(job, model)) for job in jobs))


def _client_process(url: str, jobs: list[Job], model: str, out) -> None:
    import os

    os.nice(10)  # a load generator sharing the server's cores yields them (clients are remote in production)
    try:
        out.put(("ok", asyncio.run(run_clients(url, jobs, model))))
    except BaseException as exc:  # reported to the parent, which raises it
        out.put(("error", repr(exc)))


def serve_once(url: str, jobs: list[Job], model: str) -> dict:
    """The clients in a child process; aggregate tokens/s from the first request to the last token."""
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    child = ctx.Process(target=_client_process, args=(url, jobs, model, out))
    child.start()
    status, results = out.get()
    child.join()
    if status != "ok":
        raise RuntimeError(f"the load clients failed: {results}")
    span = max(r["end"] for r in results) - min(r["start"] for r in results)
    ttft = sorted(r["ttft"] for r in results)
    return {"tokens": sum(r["tokens"] for r in results), "seconds": span, "ttft_p50": statistics.median(ttft),
            "ttft_p99": percentile(ttft, 0.99), "texts": [r["text"] for r in results],
            "cached": sum(r["cached"] for r in results)}


def offline_once(llm: LLM, jobs: list[Job]) -> dict:
    params = [SamplingParams(max_new_tokens=j.max_tokens, ignore_eos=True) for j in jobs]
    start = time.perf_counter()
    outs = llm.chat([j.messages for j in jobs], params)
    seconds = time.perf_counter() - start
    ttft = sorted(o.metrics.time_to_first_token for o in outs)
    return {"tokens": sum(len(o.token_ids) for o in outs), "seconds": seconds, "ttft_p50": statistics.median(ttft),
            "ttft_p99": ttft[-1], "texts": [o.text for o in outs]}


def run(quick: bool, model_name: str | None = None) -> list[dict]:
    from ..model import hub
    from ..model.loader import load_model
    from ..server.app import build_app
    from ..server.serve import start_in_thread

    if model_name is None:
        model_name = hub.REAL_MODEL if hub.available_offline(hub.REAL_MODEL) else None
    if model_name is None:
        raise SystemExit("bench serve needs a chat model: kvcache pull smollm2-135m")
    clients, repeats = (8, 1) if quick else (32, 5)
    jobs = workload(clients, (8, 16) if quick else LENGTHS)
    llm = LLM(load_model(model_name), kv_memory="2GiB")
    app = build_app(llm, model_name)
    server, thread, url = start_in_thread(app)
    engine = app.state.engine  # the offline runs go through its thread too: one thread ever steps the engine
    rows = []
    try:
        engine.call_blocking(lambda llm: offline_once(llm, workload(4, (4,))))  # warm up both paths' kernels
        serve_once(url, workload(4, (4,)), model_name)
        for _ in range(repeats):  # alternating, each from a cold prefix cache
            for kind in ("LLM.generate", "server"):
                engine.call_blocking(lambda llm: llm.block_manager.reset_prefix_cache())
                r = engine.call_blocking(lambda llm: offline_once(llm, jobs)) if kind == "LLM.generate" \
                    else serve_once(url, jobs, model_name)
                rows.append({"path": kind, **{k: v for k, v in r.items() if k != "texts"},
                             "tok_s": r["tokens"] / r["seconds"], "same_text": None, "texts": r["texts"]})
                print(f"  {kind}: {r['tokens']} tokens in {r['seconds']:.2f} s", flush=True)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
    reference = rows[0]["texts"]
    for r in rows:
        r["same_text"] = r.pop("texts") == reference
    print("\n" + format_table(rows, clients))
    return rows


def format_table(rows: list[dict], clients: int) -> str:
    def median(kind, key):
        return statistics.median(r[key] for r in rows if r["path"] == kind)

    offline = median("LLM.generate", "tok_s")
    pairs = [b["tok_s"] / a["tok_s"] for a, b in zip(rows[::2], rows[1::2])]  # each server run / the run before
    body_rows = [[kind, f"{median(kind, 'tok_s'):.1f}", f"{median(kind, 'tok_s') / offline:.3f}x",
                  f"{median(kind, 'ttft_p50') * 1000:.0f}", f"{median(kind, 'ttft_p99') * 1000:.0f}",
                  str(all(r["same_text"] for r in rows if r["path"] == kind))]
                 for kind in ("LLM.generate", "server")]
    note = f"\n{clients} concurrent streaming clients; medians of {len(pairs)} alternating runs; " \
           f"server / LLM.generate per pair: {', '.join(f'{x:.3f}' for x in pairs)} " \
           f"(median {statistics.median(pairs):.3f})"
    return table(["path", "aggregate tok/s", "vs LLM.generate", "TTFT p50 (ms)", "TTFT p99 (ms)",
                  "same text as the first run"], body_rows) + note
