"""``kvcache serve``: the OpenAI-compatible server; its options and start-up live in server/serve.py."""

from __future__ import annotations

import argparse

HELP = "an OpenAI-compatible HTTP server on the engine, with metrics and a page"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..server import serve

    serve.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from ..server import serve
    from ..usage import UsageError

    if args.replicas is None:
        return serve.run(args)
    serve.check_args(args)
    try:
        from ..distributed.launch import run
    except ImportError as exc:
        raise UsageError(f"--replicas needs Ray Serve: pip install -e \".[distributed]\" ({exc})") from None
    return run(args, serve.model_name(args))
