"""``kvcache bench tiers``: time to first token against the length of a prompt's prefix, when the prefix is
recomputed, found in the pool, read from the disk tier, or read from a Redis tier on loopback.

For each prefix length a fresh engine with both tiers computes ``prefix + suffix A`` (the recompute row with
tier writes on; a plain engine without tiers computes it too, so the writes' cost shows), then fresh engines
answer ``prefix + suffix B`` with only the disk tier, only the Redis tier, or (the first engine) from its
pool.  TTFT is one request's prefill and first token (``max_new_tokens=1``), the best of ``rounds``.  A real
``redis-server`` is started on a free loopback port (``maxmemory-policy allkeys-lru``); without the binary
the Redis column says so.  Runs on SmolLM2-135M when it is installed, else on the tiny shipped model.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time

import torch

from ..engine.llm import LLM
from ..engine.sequence import SamplingParams
from ..model import hub
from ..model.loader import load_model
from ..tiers import DiskStore, KVTiers, RedisStore
from .common import table

ONE = SamplingParams(max_new_tokens=1, ignore_eos=True)


def ttft(llm: LLM, prompt: list[int]) -> float:
    start = time.perf_counter()
    llm.generate([prompt], ONE)
    return time.perf_counter() - start


def start_redis(directory: str) -> tuple[subprocess.Popen, str] | None:
    if shutil.which("redis-server") is None:
        return None
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", directory,
                             "--save", "", "--appendonly", "no", "--maxmemory", "4gb",
                             "--maxmemory-policy", "allkeys-lru"], stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, f"redis://127.0.0.1:{port}/0"
        except OSError:
            time.sleep(0.05)
    proc.kill()
    return None


def bench_tiers(model, name: str, lengths, chunk: int = 256, rounds: int = 2) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        redis = start_redis(tmp)
        try:
            for length in lengths:
                rows.append(_one_length(model, name, length, chunk, rounds, tmp, redis[1] if redis else None))
                print(format_tiers_table(rows[-1:], header=len(rows) == 1), flush=True)
        finally:
            if redis:
                redis[0].kill()
                redis[0].wait()
    return rows


def _one_length(model, name, length, chunk, rounds, tmp, redis_url) -> dict:
    g = torch.Generator().manual_seed(length)
    vocab = model.config.vocab_size
    prefix = torch.randint(100, vocab, (length,), generator=g).tolist()
    times = {k: [] for k in ("recompute", "recompute + tier writes", "pool hit", "disk hit", "redis hit")}
    per_token = None
    for r in range(rounds):
        suffix_a, suffix_b = [1 + r, 2, 3, 4, 5, 6, 7, 8], [9 + r, 10, 11, 12, 13, 14, 15, 16]
        memory = f"{max(64, 3 * (length + 64) * model.config.kv_values_per_token() * 4 >> 20)}MiB"
        times["recompute"].append(ttft(LLM(model, kv_memory=memory), prefix + suffix_a))
        disk_dir = f"{tmp}/disk-{length}-{r}"
        namespace = f"kvcache-bench:{length}:{r}:"  # every round starts with nothing stored
        stores = [DiskStore(disk_dir, 64 << 30)] + ([RedisStore(redis_url, 5.0, namespace)] if redis_url else [])
        writer = LLM(model, kv_memory=memory, kv_tiers=KVTiers(stores, chunk, queue_bytes=8 << 30))
        times["recompute + tier writes"].append(ttft(writer, prefix + suffix_a))
        writer.kv_tiers.flush(300)
        disk = writer.kv_tiers.stats()["stores"]["disk"]
        per_token = disk["bytes_written"] / max(1, disk["saves"] * chunk)
        times["pool hit"].append(ttft(writer, prefix + suffix_b))
        writer.close()
        for tier, store in (("disk", lambda: DiskStore(disk_dir, 64 << 30)),
                            ("redis", (lambda: RedisStore(redis_url, 5.0, namespace)) if redis_url else None)):
            if store is None:
                continue
            reader = LLM(model, kv_memory=memory, kv_tiers=KVTiers([store()], chunk))
            times[f"{tier} hit"].append(ttft(reader, prefix + suffix_b))
            loaded = reader.stats()["tier_loaded_tokens"]
            if loaded < length // chunk * chunk - chunk:
                raise RuntimeError(f"{tier} supplied only {loaded} of {length} prefix tokens")
            reader.close()
    best = {k: min(v) if v else None for k, v in times.items()}
    return {"model": name, "prefix": length, "chunk": chunk, "ttft_s": best, "tier_bytes_per_token": per_token,
            "speedup": {k: best["recompute"] / v for k, v in best.items() if v}}


def format_tiers_table(rows: list[dict], header: bool = True) -> str:
    cols = ["recompute", "recompute + tier writes", "pool hit", "disk hit", "redis hit"]
    out = table(["model", "prefix tokens", *[f"TTFT {c} (ms)" for c in cols], "disk / redis vs recompute",
                 "stored bytes/token"],
                [[r["model"], r["prefix"], *[f"{r['ttft_s'][c] * 1e3:.0f}" if r["ttft_s"][c] else "n/a" for c in cols],
                  " / ".join(f"{r['speedup'][c]:.1f}x" if c in r["speedup"] else "n/a"
                             for c in ("disk hit", "redis hit")), f"{r['tier_bytes_per_token']:,.0f}"]
                 for r in rows])
    return out if header else "\n".join(out.splitlines()[2:])


def plot(rows: list[dict], path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs = [r["prefix"] for r in rows]
    for col in ("recompute", "pool hit", "disk hit", "redis hit"):
        ys = [r["ttft_s"][col] for r in rows]
        if all(y is not None for y in ys):
            ax.plot(xs, [y * 1e3 for y in ys], marker="o", label=col)
    ax.set(xscale="log", yscale="log", xlabel="prefix tokens", ylabel="time to first token (ms)",
           title=f"KV tiers: TTFT vs prefix length ({rows[0]['model']})")
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def run(quick: bool) -> list[dict]:
    real = not quick and hub.available_offline(hub.REAL_MODEL)
    model = load_model(hub.REAL_MODEL) if real else load_model(None)
    name = hub.REAL_MODEL if real else "shipped tiny model"
    room = model.config.max_positions - 16  # the suffix and the first token fit in the context
    lengths = (512, 1024, 2048, 4096, 8192) if real else ((128, 256) if quick else (128, 256, 448))
    lengths = tuple(min(n, room) for n in lengths)
    rows = bench_tiers(model, name, lengths, chunk=256 if real else 64, rounds=1 if quick else 2)
    if not quick:
        print(f"\nplot: {plot(rows, 'docs/tiers_ttft.png')}")
    return rows
