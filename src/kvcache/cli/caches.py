"""``kvcache caches``: every registered cache spec with its options, straight from the registry."""

from __future__ import annotations

import argparse

HELP = "the KV cache specs --kv-cache accepts, with their options"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """No options: the registry is the whole answer."""


def run(args: argparse.Namespace) -> int:
    from ..caches.registry import describe_caches

    print("cache specs: NAME[:KEY=VALUE,...], e.g. int4:group=32,residual=128,rotate=1")
    for name, description, options in describe_caches():
        print(f"\n{name:6} {description}")
        for key, option in options.items():
            choices = f" ({'|'.join(option.choices)})" if option.choices else ""
            default = "auto" if option.default is None else option.default
            print(f"         {key}={default}{choices}  {option.help}")
    return 0
