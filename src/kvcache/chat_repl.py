"""``kvcache chat``: talk to a model in the terminal, with a KV cache that persists across turns.

Replies stream token by token.  After each reply one line on stderr says how
many of the conversation's tokens this turn prefilled and how many came from
the cache.  ``/reset`` starts a new conversation, ``/exit`` (or Ctrl-D, or
Ctrl-C) leaves.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from .generation.chat import ChatSession

HELP = "commands: /reset (new conversation), /exit (or Ctrl-D / Ctrl-C)"


def turn_summary(session: ChatSession) -> str:
    s = session.last
    rate = s.new_tokens / s.seconds if s.seconds > 0 else 0.0
    return (f"[{s.new_tokens} tokens, {rate:.1f} tok/s; prefilled {s.prefilled_tokens} of {s.prompt_tokens} "
            f"conversation tokens, {s.reused_tokens} from the KV cache; cache {session.cache_bytes / 2**20:.1f} MiB]")


def repl(session: ChatSession, read: Callable[[str], str] | None = None, out=None, err=None) -> int:
    """Read-eval-print loop; returns the exit status (0, also on Ctrl-C / Ctrl-D).  Defaults: input, stdout, stderr."""
    read, out, err = read or input, out or sys.stdout, err or sys.stderr
    print(HELP, file=err)
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
            print(f"unknown command {text!r}; {HELP}", file=err)
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
