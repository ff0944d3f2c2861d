"""``kvcache eval``: perplexity, bits per byte and, per cache, the error against the exact cache."""

from __future__ import annotations

import argparse
import json

from .options import KV_HELP, MODEL_HELP, UsageError, add_dtype, check_dtype, check_spec, load_user_model

HELP = "perplexity and bits/byte of a model on a corpus"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help=MODEL_HELP)
    add_dtype(parser)
    parser.add_argument("--corpus", choices=["code", "english", "mixed"], default="code",
                        help="code: held-out Python stdlib sources; english: Python's reference docs (pydoc_data); "
                             "mixed: both, alternating")
    parser.add_argument("--text", default=None, help="a UTF-8 text file to evaluate on instead of a corpus")
    parser.add_argument("--context", type=int, default=512, help="tokens per window (default 512)")
    parser.add_argument("--max-tokens", type=int, default=8192, help="tokens in all windows together (default 8192)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--kv-cache", action="append", default=None, metavar="SPEC",
                        help=KV_HELP + "; repeat it to compare several caches in one run (one exact pass)")
    parser.add_argument("--chunk", type=int, default=256, help="tokens per forward through the cache (default 256; "
                        "results do not depend on it)")
    parser.add_argument("--recompute", type=int, default=None, metavar="N",
                        help="with a window cache: also the sliding window with recompute over N tokens "
                             "(the reference)")
    parser.add_argument("--recompute-stride", type=int, default=64, help="positions between recompute evaluations")


def run(args: argparse.Namespace) -> int:
    from .. import eval as quality
    from ..caches.registry import parse_spec

    _check_numbers(args)
    check_dtype(args.dtype)
    try:
        text = quality.read_text_file(args.text) if args.text else None
    except OSError as exc:
        raise UsageError(str(exc)) from exc
    model = load_user_model(args.model, args.dtype, args.float_activations)
    if any(parse_spec(spec)[0] == "window" for spec in args.kv_cache or []):
        return _run_stream(args, model, text)
    try:
        results = quality.evaluate_many(model, args.kv_cache or [None], text=text, corpus=args.corpus,
                                        context=args.context, max_tokens=args.max_tokens, chunk=args.chunk,
                                        progress=not args.json)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    for result in results:
        if args.json:
            print(json.dumps({"model": model.source, **result.to_dict()}))
        else:
            _print_result(model, result)
    return 0


def _check_numbers(args: argparse.Namespace) -> None:
    """Every option checked before the (slow) model load."""
    check_spec(args)
    if args.chunk < 1:
        raise UsageError(f"--chunk must be >= 1, got {args.chunk}")
    if args.recompute is not None and (args.recompute < 2 or args.recompute_stride < 1):
        raise UsageError("--recompute must be >= 2 and --recompute-stride >= 1")
    for name in ("context", "max_tokens"):
        if getattr(args, name) < 2:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 2, got {getattr(args, name)}")


def _run_stream(args: argparse.Namespace, model, text: str | None) -> int:
    """A bounded cache is measured over one stream of --max-tokens tokens (past the model's context if it must)."""
    from ..eval_stream import evaluate_stream, recompute_baseline, stream_ids, with_curve

    bucket = max(256, args.max_tokens // 16)
    try:
        ids = stream_ids(model, args.max_tokens, args.corpus, text)
        results = [evaluate_stream(model, spec, ids, chunk=args.chunk) for spec in args.kv_cache]
        if args.recompute:
            results.append(recompute_baseline(model, ids, args.recompute, args.recompute_stride))
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    for result in results:
        with_curve(result, bucket)
        if args.json:
            print(json.dumps({"model": model.source, "stream_tokens": len(ids), "cache": result.label,
                              "perplexity": result.perplexity, "kv_bytes": result.kv_bytes,
                              "curve": result.curve}))
        else:
            curve = "  ".join(f"{end // 1000}k:{ppl:.2f}" if end >= 1000 else f"{end}:{ppl:.2f}"
                              for end, ppl in result.curve)
            print(f"{result.label}: perplexity {result.perplexity:.3f} over {len(result.nll):,} positions of a "
                  f"{len(ids):,}-token stream ({result.kv_bytes:,} B of KV)\n  per {bucket:,} tokens: {curve}")
    return 0


def _print_result(model, result) -> None:
    print(f"model {model.source}, corpus {result.corpus}: {result.windows} windows x {result.context} tokens, "
          f"{result.tokens:,} predicted tokens ({result.bytes:,} bytes)")
    print(f"perplexity {result.perplexity:.3f}   {result.nll_per_token:.4f} nats/token   "
          f"{result.bits_per_byte:.4f} bits/byte")
    if result.kl_vs_exact is not None:
        delta = 100 * (result.perplexity / result.exact_perplexity - 1)
        print(f"cache {result.cache}: exact perplexity {result.exact_perplexity:.3f} ({delta:+.3f}%), "
              f"KL vs exact {result.kl_vs_exact:.5f} nats/token, top-1 agreement {100 * result.top1_agreement:.2f}%")
