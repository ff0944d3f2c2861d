"""What several subcommands check the same way: a --kv-cache spec, --ids, the load of a user-named model."""

from __future__ import annotations

import argparse

from ..usage import (
    KV_HELP,
    MODEL_HELP,
    RANDOM_SHAPES,
    UsageError,
    add_dtype,
    check_dtype,
    load_errors,
    load_for_user,
    load_user_model,
)

__all__ = ["KV_HELP", "MODEL_HELP", "RANDOM_SHAPES", "UsageError", "add_dtype", "check_dtype", "check_spec",
           "load_errors", "load_for_user", "load_user_model", "parse_ids"]


def parse_ids(text: str) -> list[int]:
    """``--ids`` as token ids: integers separated by commas and/or spaces."""
    try:
        return [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise UsageError(f"--ids must be integers separated by commas or spaces, got {text!r}") from None


def check_spec(args: argparse.Namespace) -> None:
    """A bad --kv-cache spec (one, or a repeated list) is a usage error, found before the (slow) model load."""
    from ..caches.registry import parse_spec

    for spec in args.kv_cache if isinstance(args.kv_cache, list) else [args.kv_cache]:
        if spec is None:
            continue
        try:
            parse_spec(spec)
        except (ValueError, TypeError) as exc:
            raise UsageError(f"--kv-cache: {exc}") from exc
