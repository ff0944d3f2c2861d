"""``kvcache models``: the shipped, pulled and pullable models, and where they live."""

from __future__ import annotations

import argparse
import json

HELP = "the shipped, cached and pullable models"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true")


def with_weight_bytes(row: dict) -> dict:
    """``row`` plus its model's weight bytes in each weight format (a model folder on disk only)."""
    from ..kv_shapes import shape_from_config
    from ..memory import weight_bytes

    try:
        elements = shape_from_config(row["path"]).matrix_elements if row["status"] != "pullable" else None
    except (OSError, ValueError):
        elements = None
    return {**row, "weight_bytes": weight_bytes(elements) if elements else None}


def run(args: argparse.Namespace) -> int:
    from ..memory import human_bytes_si
    from ..model import hub

    rows = [with_weight_bytes(r) for r in hub.listing()]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'name':<14} {'status':<9} {'size':>9}  where / how")
    for r in rows:
        size = f"{r['bytes'] / 1e6:.0f} MB" if r["status"] != "pullable" else f"~{r['bytes'] / 1e6:.0f} MB"
        where = r["path"] if r["status"] != "pullable" else f"kvcache pull {r['name']}  (pip: {r['path']})"
        print(f"{r['name']:<14} {r['status']:<9} {size:>9}  {where}")
        if r["weight_bytes"]:
            formats = ", ".join(f"{fmt} {human_bytes_si(n)}" for fmt, n in r["weight_bytes"].items())
            print(f"{'':<14} weights as --dtype: {formats}")
    print(f"cache directory: {hub.cache_dir()} (KVCACHE_HOME or XDG_CACHE_HOME move it)")
    return 0
