"""Prefill throughput (prompt tokens/s) of one engine on one checkpoint: single prompts of several lengths and
one batch of mixed-length prompts, one new token each, fresh random tokens every time (no prefix-cache hit).

    python tools/prefill_sweep.py MODEL_DIR kvcache          # in kvcache's environment
    /path/to/vllm-venv/bin/python tools/prefill_sweep.py MODEL_DIR vllm

Prints one JSON line per test (median of ``--reps`` runs after one warm-up).  Run the two engines one after
the other, alone on the machine; docs/benchmarks.md records the commands and the results.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np


def engine(kind: str, path: str, context: int):
    """A function ``run(prompts)`` that prefills the prompts and samples one token each."""
    if kind == "vllm":
        for key, value in (("HF_HUB_OFFLINE", "1"), ("VLLM_CPU_KVCACHE_SPACE", "4"),
                           ("VLLM_ENABLE_V1_MULTIPROCESSING", "0"), ("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")):
            os.environ.setdefault(key, value)
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt

        llm = LLM(model=path, dtype="float32", max_model_len=context, skip_tokenizer_init=True, seed=0,
                  enable_prefix_caching=True, distributed_executor_backend="uni")
        params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True, detokenize=False)
        return lambda prompts: llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params,
                                            use_tqdm=False)
    import kvcache

    llm = kvcache.LLM(path, kv_memory="4GiB")
    params = kvcache.SamplingParams(max_new_tokens=1, ignore_eos=True)
    return lambda prompts: llm.generate(prompts, params)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("engine", choices=("kvcache", "vllm"))
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    with open(os.path.join(args.model, "config.json")) as f:
        config = json.load(f)
    context = config.get("max_position_embeddings") or config["n_positions"]
    run = engine(args.engine, args.model, context)
    rng = np.random.default_rng(1)
    prompt = lambda n: [int(x) for x in rng.integers(10, 8000, n)]  # noqa: E731
    lengths = [n for n in (256, 512, 1000, 2000) if n < context]
    tests = {f"1 x {n}": lambda n=n: [prompt(n)] for n in lengths}
    mixed = [int(n) for n in np.random.default_rng(2).integers(64, min(900, context - 1), 12)]
    tests[f"{len(mixed)} mixed ({min(mixed)}-{max(mixed)}, {sum(mixed)} tokens)"] = lambda: [prompt(n) for n in mixed]
    run([prompt(64)])
    for name, make in tests.items():
        rates = []
        for i in range(args.reps + 1):
            prompts = make()
            start = time.perf_counter()
            run(prompts)
            if i:  # the first run of each shape warms the kernels
                rates.append(sum(map(len, prompts)) / (time.perf_counter() - start))
        print(json.dumps({"engine": args.engine, "model": os.path.basename(args.model.rstrip("/")), "test": name,
                          "prompt_tok_s": round(statistics.median(rates), 1)}), flush=True)


if __name__ == "__main__":
    main()
