"""``kvcache caches``: every registered cache spec with its options, straight from the registry."""

from __future__ import annotations

import argparse

HELP = "the KV cache specs --kv-cache accepts, with their options"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """No options: the registry is the whole answer."""


def run(args: argparse.Namespace) -> int:
    from ..caches.registry import REGISTRY, describe_caches

    print("cache specs: NAME[:KEY=VALUE,...], e.g. int4:group=32,residual=128,rotate=1")
    for name, description, options in describe_caches():
        print(f"\n{name:6} {description}")
        for key, option in options.items():
            choices = f" ({'|'.join(option.choices)})" if option.choices else ""
            default = "auto" if option.default is None else option.default
            print(f"         {key}={default}{choices}  {option.help}")
        print(f"         KV tiers: {_tier_bytes(REGISTRY[name])}")
    print("\nKV tiers (--kv-disk, --kv-store) store a pool's full blocks in chunks (--kv-chunk tokens) plus a ~2 KB "
          "header each; `kvcache memory MODEL --dtype D [--group-size G]` gives the bytes per token.")
    return 0


def _tier_bytes(kind) -> str:
    """What a KV tier holds per token for a cache type: the engine pool's own bytes, as they are (shown for
    SmolLM2-135M's shape: 30 layers x 3 KV heads x head_dim 64)."""
    if kind.pool is None:
        return "not stored (the engine does not serve this type)"
    import torch

    from ..caches.paged import PagedKVCache
    from ..caches.paged_quantized import PagedQuantizedKVCache
    from ..model.shapes import shape_config

    config, block = shape_config("llama-135m"), 64
    if "bits" in kind.fixed:
        per = PagedQuantizedKVCache.bytes_per_block(config, block, kind.name) / block
        return f"its codes and scales as they are: {per:,.0f} B per token on SmolLM2-135M"
    dtype = getattr(torch, kind.fixed.get("dtype", "float32"))
    per = PagedKVCache.bytes_per_block(config, block, dtype) / block
    model_dtype = "" if "dtype" in kind.fixed else " (fp32 model; half that for bf16/fp16)"
    return f"its keys and values as they are: {per:,.0f} B per token on SmolLM2-135M{model_dtype}"
