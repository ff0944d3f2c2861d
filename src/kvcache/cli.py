"""The ``kvcache`` command: demo, generate, memory, bench (decode, hf, kernels, append, throughput, prefix, memory).

User errors (a bad option value, a missing or unsupported model folder) are
reported as one ``kvcache <command>: error: ...`` line on stderr with exit
status 2, like argparse's own errors; a traceback means a bug.
"""

from __future__ import annotations

import argparse
import sys
import time


class UsageError(Exception):
    """A bad request from the user: reported on one line, exit status 2."""


def _load_errors() -> tuple[type[BaseException], ...]:
    """What loading a user-named model folder raises on bad input (not a bug)."""
    from safetensors import SafetensorError

    return (OSError, ValueError, SafetensorError)


def _load(load, model_dir: str | None, *args):
    """``load(model_dir, *args)``, with a bad folder reported as a UsageError naming it."""
    try:
        return load(model_dir, *args)
    except _load_errors() as exc:
        raise UsageError(f"cannot load --model {model_dir or '(the shipped model)'}: {exc}") from exc


def parse_ids(text: str) -> list[int]:
    """``--ids`` as token ids: integers separated by commas and/or spaces."""
    try:
        return [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise UsageError(f"--ids must be integers separated by commas or spaces, got {text!r}") from None


def _generate(args: argparse.Namespace) -> int:
    from .generation.generate import stream
    from .model.loader import load_model
    from .model.shapes import random_model
    from .model.tokenizer import StreamDecoder

    ids = parse_ids(args.ids) if args.ids is not None else None  # before the (slow) model load
    model = random_model(args.random) if args.random else _load(load_model, args.model)
    if ids is None:
        ids = model.tokenizer.encode(args.prompt)
    decoder = StreamDecoder(model.tokenizer)
    try:  # stream() validates the request before the first token
        tokens = stream(model, ids, args.max_new_tokens, use_cache=not args.no_cache,
                        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    except (ValueError, TypeError) as exc:
        raise UsageError(str(exc)) from exc
    as_ids = args.ids is not None
    if not as_ids:
        print(args.prompt, end="", flush=True)
    start, count = time.perf_counter(), 0
    for token in tokens:
        count += 1
        print(str(token) + " " if as_ids else decoder.push(token), end="", flush=True)
    print("" if as_ids else decoder.flush())
    elapsed = time.perf_counter() - start
    mode = "no cache" if args.no_cache else "KV cache"
    print(f"[{count} tokens in {elapsed:.2f} s, {count / max(elapsed, 1e-9):.1f} tok/s, {mode}]", file=sys.stderr)
    return 0


def _memory(args: argparse.Namespace) -> int:
    from . import memory

    return memory.run(args)


def _demo(args: argparse.Namespace) -> int:
    from . import demo

    if args.max_new_tokens < 1:  # checked before the load, named as the option
        raise UsageError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    start = time.perf_counter()
    model, note = _load(demo.pick_model, args.model, args.random)
    try:
        request = demo.plan(model, note, time.perf_counter() - start, args.prompt, args.max_new_tokens)
    except (ValueError, TypeError) as exc:
        raise UsageError(str(exc)) from exc
    return demo.run(request)


def _bench(args: argparse.Namespace) -> int:
    from .bench import runner

    return runner.run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvcache", description="Fast, exact KV caching for transformer decoding.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="generate with and without the cache; compare outputs, speed, memory")
    demo.add_argument("--model", default=None, help="local Hugging Face folder (default: the shipped model)")
    demo.add_argument("--random", choices=["gpt2-small", "llama-135m"], default=None,
                      help="use a random-weight model of this shape instead")
    demo.add_argument("--prompt", default="def fibonacci(n):")
    demo.add_argument("--max-new-tokens", type=int, default=128)
    demo.set_defaults(func=_demo)

    gen = sub.add_parser("generate", help="stream a completion")
    gen.add_argument("prompt", nargs="?", default="def fibonacci(n):")
    gen.add_argument("--ids", default=None, help="prompt as token ids, e.g. '1,2,3' (instead of text)")
    gen.add_argument("--model", default=None, help="local Hugging Face folder (default: the shipped model)")
    gen.add_argument("--random", choices=["gpt2-small", "llama-135m"], default=None)
    gen.add_argument("--max-new-tokens", "-n", type=int, default=128)
    gen.add_argument("--temperature", "-t", type=float, default=0.0)
    gen.add_argument("--top-k", type=int, default=None)
    gen.add_argument("--top-p", type=float, default=None)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--no-cache", action="store_true", help="recompute the whole prefix every step (baseline)")
    gen.set_defaults(func=_generate)

    mem = sub.add_parser("memory", help="KV-cache memory calculator")
    from . import memory

    memory.add_arguments(mem)
    mem.set_defaults(func=_memory)

    bench = sub.add_parser("bench", help="benchmarks, side by side, as ratios")
    from .bench import runner

    runner.add_arguments(bench)
    bench.set_defaults(func=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from .runtime import tune_malloc

    tune_malloc()  # the command owns its process (kvcache/runtime.py)
    try:
        return args.func(args)
    except UsageError as exc:
        print(f"{parser.prog} {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
