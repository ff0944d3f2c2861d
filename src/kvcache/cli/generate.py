"""``kvcache generate``: stream one completion (text, chat message or token ids), optionally speculative."""

from __future__ import annotations

import argparse
import sys
import time

from .options import (
    KV_HELP,
    MODEL_HELP,
    RANDOM_SHAPES,
    UsageError,
    add_dtype,
    check_dtype,
    check_spec,
    load_errors,
    load_user_model,
    parse_ids,
)

HELP = "stream a completion"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", nargs="?", default="def fibonacci(n):")
    parser.add_argument("--ids", default=None, help="prompt as token ids, e.g. '1,2,3' (instead of text)")
    parser.add_argument("--model", default=None, help=MODEL_HELP)
    add_dtype(parser)
    parser.add_argument("--chat", action="store_true",
                        help="send the prompt as a user message through the chat template")
    parser.add_argument("--random", choices=RANDOM_SHAPES, default=None)
    parser.add_argument("--max-new-tokens", "-n", type=int, default=128)
    parser.add_argument("--temperature", "-t", type=float, default=0.0)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--no-cache", action="store_true", help="recompute the whole prefix every step (baseline)")
    parser.add_argument("--kv-cache", default=None, metavar="SPEC", help=KV_HELP)
    parser.add_argument("--speculative", default=None, metavar="SPEC",
                        help="speculative decoding: prompt-lookup[:ngram=3,min_ngram=2,k=8] or "
                             "draft:MODEL[,k=4,layers=N]; the output is unchanged")
    parser.add_argument("--stats", action="store_true",
                        help="with --speculative: print drafts, acceptance and tokens per model pass")


def run(args: argparse.Namespace) -> int:
    from ..generation.detokenizer import Detokenizer
    from ..generation.generate import stream
    from ..model.shapes import random_model

    ids = parse_ids(args.ids) if args.ids is not None else None  # before the (slow) model load
    check_spec(args)
    check_dtype(args.dtype)
    if args.kv_cache and args.no_cache:
        raise UsageError("--kv-cache and --no-cache contradict each other")
    if args.chat and ids is not None:
        raise UsageError("--chat takes a text message, not --ids")
    build_proposer = _proposer(args)  # a bad spec fails before the (slow) model load
    model = (random_model(args.random) if args.random else
             load_user_model(args.model, args.dtype, args.float_activations))
    ids = ids if ids is not None else _encode(model, args)
    decoder = Detokenizer(model.tokenizer)
    proposer = build_proposer() if build_proposer else None
    try:  # stream() validates the request before the first token
        tokens = stream(model, ids, args.max_new_tokens, use_cache=not args.no_cache,
                        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                        cache=args.kv_cache, speculative=proposer)
    except (ValueError, TypeError) as exc:
        raise UsageError(str(exc)) from exc
    as_ids = args.ids is not None
    if not as_ids and not args.chat:
        print(args.prompt, end="", flush=True)
    stops = set(model.tokenizer.eos_token_ids) if args.chat else set()
    start, count = time.perf_counter(), 0
    for token in tokens:
        count += 1
        if token not in stops:  # a chat reply ends with its end-of-turn token: not part of the text
            print(str(token) + " " if as_ids else decoder.push(token), end="", flush=True)
    print("" if as_ids else decoder.flush())
    elapsed = time.perf_counter() - start
    mode = "no cache" if args.no_cache else f"KV cache {args.kv_cache or 'auto'}"
    print(f"[{count} tokens in {elapsed:.2f} s, {count / max(elapsed, 1e-9):.1f} tok/s, {mode}]", file=sys.stderr)
    if args.stats and proposer is not None:
        print(f"[speculative {args.speculative}: {proposer.stats}]", file=sys.stderr)
    return 0


def _encode(model, args: argparse.Namespace) -> list[int]:
    """The prompt as token ids: through the chat template with --chat, else as plain text."""
    try:
        if args.chat:
            return model.tokenizer.encode_chat([{"role": "user", "content": args.prompt}])
        return model.tokenizer.encode(args.prompt)
    except (ValueError, TypeError) as exc:
        raise UsageError(str(exc) if args.chat else f"the prompt: {exc}") from exc


def _proposer(args: argparse.Namespace):
    """``--speculative``: its spec checked now; a function building the proposer (loading a draft model)."""
    from ..generation import speculative

    if args.stats and not args.speculative:
        raise UsageError("--stats reports speculative decoding: use it with --speculative")
    if not args.speculative:
        return None
    if args.no_cache:
        raise UsageError("--speculative verifies drafts over the KV cache: it cannot run with --no-cache")
    try:
        speculative.check_spec(args.speculative)
    except ValueError as exc:
        raise UsageError(f"--speculative: {exc}") from exc

    def build():
        from ..model.loader import load_model

        try:
            return speculative.make_proposer(args.speculative, load=load_model)
        except load_errors() as exc:
            raise UsageError(f"--speculative: {exc}") from exc

    return build
