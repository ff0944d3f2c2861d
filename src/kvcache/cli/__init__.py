"""The ``kvcache`` command: one module per subcommand, each with ``HELP``, ``add_arguments`` and ``run``.

``--model`` takes a Hugging Face folder, a ``.gguf`` file, or a model name
(``kvcache models``; a named model is pulled and converted on first use).

User errors (a bad option value, a missing or unsupported model folder) are
reported as one ``kvcache <command>: error: ...`` line on stderr with exit
status 2, like argparse's own errors; a traceback means a bug.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from ..usage import UsageError

COMMANDS = ("demo", "generate", "chat", "eval", "pull", "models", "caches", "memory", "serve", "bench")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvcache", description="Fast, exact KV caching for transformer decoding.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        command = importlib.import_module(f"{__name__}.{name}")
        command.add_arguments(sub.add_parser(name, help=command.HELP))
        sub.choices[name].set_defaults(func=command.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from ..runtime import tune_malloc

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
