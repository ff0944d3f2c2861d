"""``kvcache memory``: the KV-cache memory calculator (kvcache/memory.py) on the command line; torch-free."""

from __future__ import annotations

import argparse
import json

from .options import UsageError

HELP = "KV-cache memory calculator"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..memory import DTYPE_BYTES

    parser.add_argument("model", nargs="?", default=None,
                        help="preset name or alias (case-insensitive; see --list) or path to a config.json / "
                             "model folder")
    parser.add_argument("--tokens", type=int, default=None,
                        help="context length in tokens (default: the model's max positions)")
    parser.add_argument("--batch", type=int, default=1, help="number of sequences (default: 1)")
    parser.add_argument("--dtype", default="fp16", help=f"KV storage dtype: {', '.join(DTYPE_BYTES)} (default: fp16)")
    parser.add_argument("--group-size", type=int, default=None,
                        help="int8/int4 only: size kvcache's quantized cache (codes + fp16 scale/offset per group)")
    parser.add_argument("--residual", type=int, default=0,
                        help="with --group-size: most recent tokens kept in full precision (default 0)")
    parser.add_argument("--sinks", type=int, default=0,
                        help="with --group-size: first tokens kept in full precision (default 0)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--list", action="store_true", help="list the presets with their per-token KV bytes and exit")


def run(args: argparse.Namespace) -> int:
    from .. import memory

    try:
        if args.list:
            print(json.dumps(memory.preset_rows(args.dtype), indent=2) if args.json else
                  f"{memory.format_presets(args.dtype)}\naliases: {memory.alias_list()}")
            return 0
        if not args.model:
            raise UsageError(f"no model given; pass a preset name or a config path. "
                             f"Presets: {', '.join(memory.PRESETS)}")
        report = memory.memory_report(args.model, tokens=args.tokens, batch=args.batch, dtype=args.dtype,
                                      group_size=args.group_size, residual=args.residual, sinks=args.sinks)
    except (ValueError, TypeError, OSError) as exc:
        raise UsageError(str(exc)) from exc
    print(json.dumps(report.to_dict(), indent=2) if args.json else memory.format_report(report))
    return 0
