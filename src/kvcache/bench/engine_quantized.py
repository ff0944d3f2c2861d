"""The engine with a quantized pool at long context: decode throughput and how many sequences fit.

Throughput: ``sequences`` requests of ``context`` prompt tokens each are
prefilled in one engine per cache (full precision, int8, int4; all alive in one
process), then the engines decode in alternating rounds of ``steps`` steps --
one token per sequence per step -- so that they share the machine's state.
Reported: decode tok/s (median round) and the ratio to full precision, the
prefill time, and what a decode step reads -- every weight once plus every
sequence's cached KV, at the pool's bytes per token -- as MB and as GB/s against
the read bandwidth measured in the same process (decoding is bound by it).
Capacity: how many ``context``-token sequences one ``kv_memory`` budget holds
for each cache (quantized blocks plus one full-precision staging block per
sequence), checked by building the engine with that many sequences.
"""

from __future__ import annotations

import random
import statistics

from ..engine.llm import LLM, parse_bytes
from ..engine.sequence import SamplingParams
from .common import read_bandwidth, table, timed, weight_bytes

SPECS = ("auto", "int8", "int4")


def _model(quick: bool):
    from ..model import hub
    from ..model.loader import load_model
    from ..model.shapes import random_model

    if not quick and hub.available_offline(hub.REAL_MODEL):
        return load_model(hub.ensure(hub.REAL_MODEL)), hub.REAL_MODEL
    shape = "tiny-llama" if quick else "llama-135m"
    return random_model(shape), f"{shape} (random weights)"


def _prefilled(model, spec: str, prompts: list[list[int]], new_tokens: int) -> tuple[LLM, float]:
    blocks = sum(-(-(len(p) + new_tokens) // 16) for p in prompts) + 16  # every sequence fits, none preempted
    # a prompt longer than the token budget is admitted only into an empty batch (the scheduler does not chunk
    # one prompt), so the budget holds a whole prompt plus every decode: all sequences run together
    budget = max(len(p) for p in prompts) + len(prompts)
    llm = LLM(model, num_blocks=blocks, kv_cache=None if spec == "auto" else spec, max_num_seqs=len(prompts),
              max_batch_tokens=budget)
    for prompt in prompts:
        llm.add_request(prompt, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True))

    def prefill():
        while any(seq.num_output == 0 for seq in llm.scheduler.running) or llm.scheduler.waiting:
            llm.step()

    seconds, _ = timed(prefill)
    return llm, seconds


def bench_throughput(model, name: str, sequences: int = 16, context: int = 4096, steps: int = 16,
                     rounds: int = 3, specs=SPECS) -> list[dict]:
    rng = random.Random(0)
    prompts = [[rng.randrange(1, model.config.vocab_size) for _ in range(context)] for _ in range(sequences)]
    # nobody finishes during the timed rounds: the early prompts already decode while the later ones prefill
    new_tokens = sequences + steps * rounds + 8
    engines = {spec: _prefilled(model, spec, prompts, new_tokens) for spec in specs}
    rates: dict[str, list[float]] = {spec: [] for spec in specs}
    cached: dict[str, list[int]] = {spec: [] for spec in specs}  # tokens every step attends over, per round
    for _ in range(rounds):
        for spec, (llm, _) in engines.items():
            before = sum(seq.num_output for seq in llm.scheduler.running)
            cached[spec].append(sum(seq.num_computed for seq in llm.scheduler.running) + sequences * steps // 2)
            seconds, _ = timed(lambda: [llm.step() for _ in range(steps)])
            produced = sum(seq.num_output for seq in llm.scheduler.running) - before
            assert produced == sequences * steps, (spec, produced)  # every sequence decoded every step
            rates[spec].append(produced / seconds)
    base = statistics.median(rates[specs[0]])
    bandwidth, weights = read_bandwidth(), weight_bytes(model)
    rows = []
    for spec, (llm, prefill_s) in engines.items():
        tok_s = statistics.median(rates[spec])
        read = weights + statistics.mean(cached[spec]) * llm.kv_block_bytes / llm.block_size
        rows.append({"model": name, "cache": spec, "engine_spec": llm.kv_cache_spec, "sequences": sequences,
                     "context": context, "decode_tok_s": tok_s, "vs_fp": tok_s / base, "prefill_s": prefill_s,
                     "kv_bytes": llm.cache.nbytes, "mb_read_per_step": read / 1e6,
                     "gb_s": read * tok_s / sequences / 1e9, "read_bandwidth_gb_s": bandwidth / 1e9,
                     "of_bandwidth": read * tok_s / sequences / bandwidth})
    return rows


def bench_capacity(model, name: str, kv_memory: str = "1GiB", context: int = 4096, specs=SPECS) -> list[dict]:
    budget, rows = parse_bytes(kv_memory), []
    for spec in specs:
        kv_cache = None if spec == "auto" else spec
        probe = LLM(model, num_blocks=1, kv_cache=kv_cache)
        per_seq = probe.block_manager.blocks_for(context) * probe.kv_block_bytes
        staging = probe.cache.nbytes - probe.kv_block_bytes  # one full-precision block per sequence (0 for fp32)
        fits = budget // (per_seq + staging)
        llm = LLM(model, kv_memory=budget, kv_cache=kv_cache, max_num_seqs=max(1, fits))
        assert llm.max_concurrent(context) >= fits, (spec, fits, llm.max_concurrent(context))
        rows.append({"model": name, "cache": spec, "kv_memory": kv_memory, "context": context, "sequences": fits,
                     "bytes_per_token": (per_seq + staging) / context, "num_blocks": llm.num_blocks,
                     "staging_blocks": llm.kv_staging_blocks, "kv_bytes": llm.cache.nbytes})
    for r in rows:
        r["vs_fp"] = r["sequences"] / rows[0]["sequences"]
        r["bytes_vs_fp"] = rows[0]["bytes_per_token"] / r["bytes_per_token"]
    return rows


def run(quick: bool) -> dict:
    model, name = _model(quick)
    throughput = bench_throughput(model, name, sequences=4 if quick else 16, context=256 if quick else 4096,
                                  steps=2 if quick else 16, rounds=1 if quick else 3)
    print(format_throughput_table(throughput) + "\n", flush=True)
    capacity = bench_capacity(model, name, kv_memory="64MiB" if quick else "1GiB", context=256 if quick else 4096)
    print(format_capacity_table(capacity), flush=True)
    return {"throughput": throughput, "capacity": capacity}


def format_throughput_table(rows: list[dict]) -> str:
    return table(["model", "cache (engine spec)", "sequences x context", "decode tok/s", "vs full precision",
                  "prefill (s)", "KV pool", "MB read/step", "GB/s", "of read bandwidth"],
                 [[r["model"], f"`{r['engine_spec']}`", f"{r['sequences']} x {r['context']:,}",
                   f"{r['decode_tok_s']:.1f}", f"{r['vs_fp']:.2f}x", f"{r['prefill_s']:.1f}",
                   f"{r['kv_bytes'] / 2**20:,.0f} MiB", f"{r['mb_read_per_step']:,.0f}", f"{r['gb_s']:.1f}",
                   f"{100 * r['of_bandwidth']:.0f}% of {r['read_bandwidth_gb_s']:.1f} GB/s"] for r in rows])


def format_capacity_table(rows: list[dict]) -> str:
    return table(["model", "cache", f"{rows[0]['context']:,}-token sequences in {rows[0]['kv_memory']}",
                  "vs full precision", "KV bytes per token (incl. staging)", "bytes vs full precision"],
                 [[r["model"], r["cache"], r["sequences"], f"{r['vs_fp']:.2f}x", f"{r['bytes_per_token']:,.0f}",
                   f"{r['bytes_vs_fp']:.2f}x"] for r in rows])
