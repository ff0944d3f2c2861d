"""``kvcache serve``: the OpenAI-compatible server; its options and start-up live in server/serve.py."""

from __future__ import annotations

import argparse

HELP = "an OpenAI-compatible HTTP server on the engine, with metrics and a page"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..server import serve

    serve.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from ..server import serve

    return serve.run(args)
