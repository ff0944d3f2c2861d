"""The engine's KV pool: the registry's pool class for the spec, sized from a memory budget.

``kv_cache=None`` / ``"auto"`` (or the model's own dtype name) is the full-precision pool, a quantized
spec (``"int8"``, ``"int4:rotate=1"``) the quantized one, ``"window:size=W,sinks=S"`` the full-precision
pool with bounded attention.  Which class serves a name, or why none does, is declared once, in the
registry (caches/registry.py); the pool classes follow ``PagedPool`` (caches/base.py).
"""

from __future__ import annotations

from collections.abc import Callable

from ..caches.base import PagedPool, PoolSizing
from ..caches.registry import CacheSpec


def make_pool(model, kv_cache: str | None, budget: int | None, num_blocks: int | None, block_size: int,
              max_num_seqs: int, in_use: Callable[[int], bool], label: str = "") -> PagedPool:
    """A pool of ``num_blocks`` blocks, or as many as ``budget`` bytes hold (``label`` names the budget in
    errors).  The spec is parsed here, once."""
    spec = CacheSpec.parse(kv_cache)
    try:
        pool_class = spec.type.pool_class()
    except ValueError as exc:
        raise ValueError(f"kv_cache {kv_cache!r}: {exc}") from None
    return pool_class.for_engine(model, spec, PoolSizing(budget, num_blocks, block_size, max_num_seqs, in_use, label))
