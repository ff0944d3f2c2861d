"""``kvcache chat``: talk to a model in the terminal, with a KV cache that persists across turns.

Replies stream token by token.  After each reply one line on stderr says how
many of the conversation's tokens this turn prefilled and how many came from
the cache.  ``/reset`` starts a new conversation, ``/exit`` (or Ctrl-D, or
Ctrl-C) leaves.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from .options import KV_HELP, MODEL_HELP, UsageError, add_dtype, check_dtype, check_spec, load_user_model

HELP = "interactive chat; the KV cache persists across turns"
if TYPE_CHECKING:
    from ..generation.chat import ChatSession

COMMANDS = "commands: /reset (new conversation), /exit (or Ctrl-D / Ctrl-C)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m", help=MODEL_HELP.replace("the shipped model", "smollm2-135m"))
    add_dtype(parser)
    parser.add_argument("--system", default=None, help="a system message (default: the template's own)")
    parser.add_argument("--max-new-tokens", "-n", type=int, default=256)
    parser.add_argument("--temperature", "-t", type=float, default=0.0)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--kv-cache", default=None, metavar="SPEC", help=KV_HELP)


def run(args: argparse.Namespace) -> int:
    from ..generation.chat import ChatSession
    from ..generation.sampling import SamplingConfig
    from ..generation.validation import check_seed

    check_spec(args)
    check_dtype(args.dtype)
    try:  # the sampling options, before the (slow) model load
        SamplingConfig(args.temperature, args.top_k, args.top_p)
        check_seed(args.seed)
        if args.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    except (ValueError, TypeError) as exc:
        raise UsageError(str(exc)) from exc
    model = load_user_model(args.model, args.dtype, args.float_activations)
    try:
        session = ChatSession(model, system=args.system, max_new_tokens=args.max_new_tokens, kv_cache=args.kv_cache,
                              temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    print(f"kvcache chat: {model.source}", file=sys.stderr)
    return repl(session)


def turn_summary(session: ChatSession) -> str:
    s = session.last
    rate = s.new_tokens / s.seconds if s.seconds > 0 else 0.0
    return (f"[{s.new_tokens} tokens, {rate:.1f} tok/s; prefilled {s.prefilled_tokens} of {s.prompt_tokens} "
            f"conversation tokens, {s.reused_tokens} from the KV cache; cache {session.cache_bytes / 2**20:.1f} MiB]")


def repl(session: ChatSession, read: Callable[[str], str] | None = None, out=None, err=None) -> int:
    """Read-eval-print loop; returns the exit status (0, also on Ctrl-C / Ctrl-D).  Defaults: input, stdout, stderr."""
    read, out, err = read or input, out or sys.stdout, err or sys.stderr
    print(COMMANDS, file=err)
    while True:
        try:
            line = read("you> ")
        except (EOFError, KeyboardInterrupt):
            print(file=out)
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            session.reset()
            print("[conversation reset]", file=err)
            continue
        if text.startswith("/"):
            print(f"unknown command {text!r}; {COMMANDS}", file=err)
            continue
        try:
            print("assistant> ", end="", file=out, flush=True)
            for piece in session.send(text):
                print(piece, end="", file=out, flush=True)
            print(file=out)
            print(turn_summary(session), file=err)
        except KeyboardInterrupt:
            print(file=out)
            return 0
        except ValueError as exc:  # e.g. the conversation outgrew the model's context
            print(f"\nerror: {exc}", file=err)
