"""``kvcache bench``: the benchmark scenarios, side by side, as ratios (bench/scenarios.py runs them)."""

from __future__ import annotations

import argparse

HELP = "benchmarks, side by side, as ratios"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..bench import scenarios

    scenarios.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from ..bench import scenarios

    return scenarios.run(args)
