"""``kvcache bench replicas``: engine replicas on Ray Serve (this machine, a local cluster).

Routing: 8 system prompts (1-2k tokens each) x 64 user turns, shuffled, sent by 16 concurrent streaming chat
clients, once per router -- prefix-aware, Ray Serve's power of two choices, round-robin -- each on freshly
deployed replicas.  The KV pool of each replica holds a bit more than half of the system prompts, as a
real deployment's pools hold a fraction of its traffic's prefixes: only a router that keeps each prompt on one
replica gets the pools' sum.  Prints mean/p50/p99 TTFT, throughput, the pools' hit rate and the largest
replica's share of requests; the texts must be equal across routers (greedy).

Scaling: the same kind of load on 1 replica (all cores, both pools' memory) and on 2 (half the cores and half the
memory each), prefix routing.
"""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from .common import percentile, table
from .server_load import TOPICS, Job, body, stream_chat

ROUTERS = ("prefix", "pow2", "round-robin")


def system_prompts(tokenizer, count: int, low: int, high: int) -> list[str]:
    """``count`` distinct system prompts from ``low`` to ``high`` tokens long."""
    prompts = []
    for i in range(count):
        target = low + (high - low) * i // max(1, count - 1)
        lines, n = [f"You are assistant number {i} of a team; these are your {count * 7 + i} house rules."], 0
        while n < target:
            topic = TOPICS[(len(lines) * (i + 3)) % len(TOPICS)]
            lines.append(f"Rule {len(lines)} for team {i}: when asked about {topic}, answer briefly and cite the "
                         f"standard library first.")
            n = len(tokenizer.encode("\n".join(lines)))
        prompts.append("\n".join(lines))
    return prompts


def workload(systems: list[str], turns: int, max_tokens: int, seed: int = 0) -> list[Job]:
    jobs = [Job([{"role": "system", "content": s},
                 {"role": "user", "content": f"Turn {t}: in one sentence, what is {TOPICS[t % len(TOPICS)]}?"}],
                max_tokens) for s in systems for t in range(turns)]
    random.Random(seed).shuffle(jobs)
    return jobs


async def _clients(url: str, jobs: list[Job], model: str, clients: int) -> list[dict]:
    import httpx

    queue: asyncio.Queue = asyncio.Queue()
    for i, job in enumerate(jobs):
        queue.put_nowait((i, job))
    results: list[dict | None] = [None] * len(jobs)
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=1200, limits=limits) as http:
        async def worker():
            while not queue.empty():
                i, job = queue.get_nowait()
                results[i] = await stream_chat(http, url, body(job, model))

        await asyncio.gather(*(worker() for _ in range(clients)))
    return results


def _counters(url: str) -> dict:
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    out: dict = {"queries": 0.0, "hits": 0.0, "requests": {}}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=30).text):
        for s in family.samples:
            if s.name == "kvcache:prefix_cache_queries_total":
                out["queries"] += s.value
            elif s.name == "kvcache:prefix_cache_hits_total":
                out["hits"] += s.value
            elif s.name == "kvcache:request_success_total":
                out["requests"][s.labels["replica"]] = out["requests"].get(s.labels["replica"], 0) + s.value
    return out


def measure(url: str, jobs: list[Job], model: str, clients: int) -> dict:
    time.sleep(1.5)  # the replicas' last posts (counters) reach the board
    before = _counters(url)
    results = asyncio.run(_clients(url, jobs, model, clients))
    time.sleep(1.5)
    after = _counters(url)
    span = max(r["end"] for r in results) - min(r["start"] for r in results)
    ttft = sorted(r["ttft"] for r in results)
    e2e = sorted(r["end"] - r["start"] for r in results)
    per_replica = {k: v - before["requests"].get(k, 0) for k, v in after["requests"].items()}
    return {"requests": len(results), "seconds": span, "tok_s": sum(r["tokens"] for r in results) / span,
            "ttft_mean": statistics.fmean(ttft), "ttft_p50": percentile(ttft, 0.5), "ttft_p99": percentile(ttft, 0.99),
            "e2e_p50": percentile(e2e, 0.5), "e2e_p99": percentile(e2e, 0.99),
            "hit_rate": (after["hits"] - before["hits"]) / max(1.0, after["queries"] - before["queries"]),
            "max_share": max(per_replica.values()) / max(1.0, sum(per_replica.values())),
            "texts": [r["text"] for r in results]}


def run(quick: bool, routers: tuple[str, ...] = ROUTERS, scaling: bool = True) -> dict:
    try:
        import ray  # noqa: F401
    except ImportError:
        raise SystemExit('bench replicas needs Ray Serve: pip install -e ".[distributed]"') from None
    from ..distributed.launch import replace, start, stop
    from ..model import hub
    from ..model.loader import load_model
    from ..server.serve import serve_options

    model_name = None if quick else hub.REAL_MODEL
    if model_name is not None and not hub.available_offline(model_name):
        raise SystemExit("bench replicas needs the real model: kvcache pull smollm2-135m")
    if model_name is None:  # the shipped model, given a chat template in a copy of its folder
        model_name = str(shipped_model_with_chat_template(tempfile.mkdtemp(prefix="kvcache-bench-")))
    model = load_model(model_name)
    tok, cfg = model.tokenizer, model.config
    prompts, turns, clients, max_tokens = (2, 4, 4, 8) if quick else (8, 64, 16, 16)
    low, high = (150, 250) if quick else (1024, 2048)
    systems = system_prompts(tok, prompts, low, high)
    jobs = workload(systems, turns, max_tokens)
    prefix_tokens = sum(len(tok.encode(s)) for s in systems)
    kv_per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 4  # fp32 K and V
    pool_tokens = int(0.55 * prefix_tokens) + clients * 128
    kv_memory = pool_tokens * kv_per_token
    name = "kvcache-default" if quick else model_name
    print(f"{len(jobs)} requests ({prompts} system prompts of {low}-{high} tokens x {turns} turns, {max_tokens} "
          f"tokens each), {clients} clients; KV pool per replica {pool_tokens} tokens ({kv_memory / 2**20:.0f} MiB) "
          f"for {prefix_tokens} tokens of system prompts", flush=True)
    options = dict(model=model_name, kv_memory=str(kv_memory), max_num_seqs=64, log_level="warning", port=0,
                   served_model_name=name)
    rows, url = [], None
    try:
        for router in routers:
            args = serve_options(**options, replicas=2, router=router)
            if url is None:
                url = start(args, name)
            else:
                replace(args, name)
            r = measure(url, jobs, name, clients)
            rows.append({"part": "routing", "router": router, "replicas": 2, **r})
            print(f"  {router}: mean TTFT {r['ttft_mean']:.3f} s, {r['tok_s']:.1f} tok/s, hit rate "
                  f"{r['hit_rate']:.1%}, largest share {r['max_share']:.1%}", flush=True)
        scale_jobs = jobs if quick else workload(systems, 16, 32, seed=1)
        for replicas in (1, 2) if scaling else ():  # the same KV memory in all: one pool or two halves
            total = {**options, "kv_memory": str(2 * kv_memory // replicas)}
            args = serve_options(**total, replicas=replicas, router="prefix")
            if url is None:
                url = start(args, name)
            else:
                replace(args, name)
            r = measure(url, scale_jobs, name, clients)
            rows.append({"part": "scaling", "router": "prefix", "replicas": replicas, **r})
            print(f"  {replicas} replica(s): {r['tok_s']:.1f} tok/s", flush=True)
    finally:
        if url is not None:
            stop()
    reference = rows[0]["texts"] if rows else []
    for r in rows:
        texts = r.pop("texts")
        r["same_text"] = texts == reference if r["part"] == "routing" else None
    print("\n" + format_tables(rows))
    return {"rows": rows, "pool_tokens": pool_tokens, "prefix_tokens": prefix_tokens}


def format_tables(rows: list[dict]) -> str:
    routing = [r for r in rows if r["part"] == "routing"]
    base = next((r for r in routing if r["router"] == "prefix"), routing[0] if routing else None)
    heads = ["router", "mean TTFT (s)", "TTFT p50 / p99 (s)", "vs prefix-aware", "output tok/s", "pool hit rate",
             "largest replica share", "same text"]
    lines = [] if not routing else [table(heads,
                   [[r["router"], f"{r['ttft_mean']:.3f}", f"{r['ttft_p50']:.3f} / {r['ttft_p99']:.3f}",
                     f"{r['ttft_mean'] / base['ttft_mean']:.2f}x", f"{r['tok_s']:.1f}", f"{r['hit_rate']:.1%}",
                     f"{r['max_share']:.1%}", str(r["same_text"])] for r in routing])]
    scaling = [r for r in rows if r["part"] == "scaling"]
    if scaling:
        lines.append(table(["replicas", "output tok/s", "TTFT p50 / p99 (s)", "latency p50 / p99 (s)"],
                           [[str(r["replicas"]), f"{r['tok_s']:.1f}", f"{r['ttft_p50']:.3f} / {r['ttft_p99']:.3f}",
                             f"{r['e2e_p50']:.3f} / {r['e2e_p99']:.3f}"] for r in scaling]))
    return "\n\n".join(lines)


CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def shipped_model_with_chat_template(directory: str | Path) -> Path:
    """A copy of the shipped model's folder whose tokenizer config carries a ChatML template (the shipped model
    has none), for chat through replicas that load the model from a folder."""
    from ..model.loader import DEFAULT_MODEL_DIR

    target = Path(directory) / "code-model"
    shutil.copytree(DEFAULT_MODEL_DIR, target)
    (target / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML}))
    return target
