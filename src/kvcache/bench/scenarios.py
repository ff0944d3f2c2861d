"""``kvcache bench SCENARIO``: run benchmarks and print markdown tables (ratios side by side)."""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SCENARIOS = ("decode", "hf", "kernels", "append", "throughput", "prefix", "memory", "kv-quant", "engine-quant",
             "speculative", "serve", "mla", "stream", "compress", "tiers", "replicas")
# scenario -> the bench module whose run(quick) measures and prints it
SELF_REPORTING = {"speculative": "spec_decoding", "engine-quant": "engine_quantized", "serve": "server_load",
                  "mla": "latent", "stream": "streaming", "compress": "compression",
                  "tiers": "tiers", "replicas": "replicas"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("scenario", choices=SCENARIOS + ("all",), help="which benchmark to run")
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run in seconds, not for the record")
    parser.add_argument("--plot", default="docs/decode_cached_vs_uncached.png", help="PNG for the decode scenario")
    parser.add_argument("--json", default=None, help="also write raw results to this JSON file")


def run(args: argparse.Namespace) -> int:
    """One scenario in this process; ``all`` runs each in a fresh process, so that one scenario's
    memory and kernel caches cannot speed up or slow down the next (measured: up to 15%)."""
    print(f"# kvcache bench ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M')})\n")
    if args.scenario == "all":
        results = {name: _run_isolated(name, args.quick, args.plot) for name in SCENARIOS}
    else:
        results = {args.scenario: run_scenario(args.scenario, args.quick, args.plot)}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2, default=str)
    return 0


def _run_isolated(name: str, quick: bool, plot: str | None) -> object:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        code = "import sys; from kvcache.bench.scenarios import scenario_main; scenario_main(sys.argv[1:])"
        subprocess.run([sys.executable, "-c", code, name, str(out), "1" if quick else "0", plot or ""], check=True)
        return json.loads(out.read_text())


def scenario_main(argv: list[str]) -> None:
    """Child-process entry of ``_run_isolated``: name, JSON path, quick flag, plot path."""
    name, out, quick, plot = argv
    rows = run_scenario(name, quick == "1", plot or None)
    Path(out).write_text(json.dumps(rows, default=str))


def run_scenario(name: str, quick: bool, plot: str | None) -> object:
    """Run one scenario, print its markdown table(s); the raw rows."""
    from ..runtime import tune_malloc
    from . import append, attention_kernels, decode, hf_compare, serving

    tune_malloc()  # the same allocator settings for every contender (the engine sets them anyway)
    print(f"## {name}\n", flush=True)
    from ..model import hub

    real = not quick and hub.available_offline(hub.REAL_MODEL)  # joins the full runs once it can be had offline
    if name == "decode":
        rows = decode.bench_decode(lengths=(16, 32) if quick else (64, 128, 256, 512, 1024))
        if not quick:
            rows += decode.bench_decode("gpt2-small", lengths=(64, 128, 256))
        if real:
            rows += decode.bench_decode(decode.REAL, lengths=(64, 128, 256, 512))
        print("\n" + decode.format_decode_table(rows))
        formats = decode.bench_formats(steps=4 if quick else 32, context=32 if quick else 256)
        if real:
            formats += decode.bench_formats(decode.REAL, decode.REAL_FORMATS)
        print("\n" + decode.format_formats_table(formats))
        if plot and not quick:
            shown = decode.REAL if real else "tiny-llama"
            print(f"\nplot: {decode.plot_decode([r for r in rows if r['shape'] == shown], plot)}")
        rows = {"decode": rows, "formats": formats}
    elif name == "hf":
        shapes = ("gpt2-small",) if quick else ("gpt2-small", "llama-135m") + ((hf_compare.REAL,) if real else ())
        rows = hf_compare.bench_hf(new_tokens=16 if quick else 256, rounds=1 if quick else 3, shapes=shapes)
        print("\n" + hf_compare.format_hf_table(rows))
    elif name == "kernels":
        rows = {"attention": attention_kernels.bench_decode_attention((256,) if quick else (1024, 4096, 16384)),
                "growth": attention_kernels.bench_cache_growth((64,) if quick else (1024, 4096))}
        print(attention_kernels.format_attention_table(rows["attention"]) + "\n")
        print(attention_kernels.format_growth_table(rows["growth"]))
    elif name == "append":
        rows = append.bench_append(sizes=(1000,) if quick else (10_000, 100_000))
        print("\n" + append.format_append_table(rows))
    elif name == "throughput":
        rows = []
        for shape in (("tiny-llama",) if quick else ("gpt2-small", "llama-135m")):
            rows += serving.bench_throughput(shape, concurrency=(1, 4) if quick else (1, 4, 16, 64),
                                             new_tokens=8 if quick else 64,
                                             sequential_requests=2 if quick else 4)
        print("\n" + serving.format_throughput_table(rows))
    elif name == "prefix":
        rows = serving.bench_prefix("tiny-llama", requests=4, prefix_len=64, new_tokens=4) if quick \
            else serving.bench_prefix()
        print("\n" + serving.format_prefix_table(rows))
        on, off = rows
        print(f"\nprefill tokens: {off['prefill_tokens'] / on['prefill_tokens']:.1f}x fewer; mean TTFT "
              f"{off['mean_ttft_s'] / on['mean_ttft_s']:.1f}x lower; total {off['total_s'] / on['total_s']:.1f}x "
              f"faster; identical outputs: {on['identical_outputs']}")
    elif name == "memory":
        rows = serving.bench_memory_efficiency(requests=8 if quick else 64)
        print("\n" + serving.format_memory_table(rows))
    elif name == "kv-quant":
        from . import kv_quant

        rows = kv_quant.bench_quantized(lengths=(64, 256) if quick else (512, 2048, 4096, 8192),
                                         steps=2 if quick else 8, rounds=2 if quick else 4, quick=quick)
        print("\n" + kv_quant.format_quantized_table(rows))
        prefill = kv_quant.bench_prefill(lengths=(64, 256) if quick else (2048, 8192), rounds=1 if quick else 2,
                                         quick=quick)
        print("\n" + kv_quant.format_prefill_table(prefill))
        rows = {"decode": rows, "prefill": prefill}
    else:  # a module whose run(quick) prints its own tables
        rows = importlib.import_module(f".{SELF_REPORTING[name]}", __package__).run(quick)
    print(flush=True)
    return rows
