"""The engine's KV pool, chosen by a cache spec and sized from a memory budget.

``kv_cache=None`` / ``"auto"`` (or the model's own dtype name) is the
full-precision :class:`~kvcache.caches.paged.PagedKVCache`; a quantized spec
(``"int8"``, ``"int4"``, ``"int4:rotate=1"``) is the
:class:`~kvcache.caches.paged_quantized.PagedQuantizedKVCache`, whose budget
holds the quantized blocks plus one full-precision staging block per
sequence that can run at once (``max_num_seqs``, and never more than the
blocks themselves): each running sequence fills one block at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..caches.base import parse_spec
from ..caches.paged import PagedKVCache
from ..caches.paged_quantized import PagedQuantizedKVCache, engine_spec
from ..runtime import check_fits

FULL_PRECISION = ("auto", "fp32", "fp64", "fp16", "bf16")  # registry names whose `dtype` must be the model's


@dataclass
class Pool:
    cache: PagedKVCache | PagedQuantizedKVCache
    num_blocks: int
    spec: str  # the single-stream spec that quantizes exactly as this pool ("auto" for full precision)
    block_bytes: int  # one block, every layer (quantized: codes and scales)
    staging_blocks: int  # full-precision blocks for the blocks being filled (0 for a full-precision pool)


def make_pool(model, kv_cache: str | None, budget: int | None, num_blocks: int | None, block_size: int,
              max_num_seqs: int, in_use: Callable[[int], bool], label: str = "") -> Pool:
    """A pool of ``num_blocks`` blocks, or as many as ``budget`` bytes hold (``label`` names the budget in
    errors)."""
    config, dtype = model.config, model.dtype
    fp_block = PagedKVCache.bytes_per_block(config, block_size, dtype)
    name, options = parse_spec("auto" if kv_cache is None else kv_cache)
    if name in FULL_PRECISION:
        if options.get("dtype") not in (None, str(dtype).removeprefix("torch.")):
            raise ValueError(f"kv_cache {kv_cache!r}: the engine's full-precision pool stores the model's dtype "
                             f"({str(dtype).removeprefix('torch.')}); use 'auto', or a quantized cache")
        blocks = num_blocks if num_blocks is not None else budget // fp_block
        _check(blocks, fp_block, kv_cache, label)
        check_fits(blocks * fp_block, _what(blocks, label))
        return Pool(PagedKVCache.for_model(model, blocks, block_size), blocks, "auto", fp_block, 0)
    if config.mla is not None:
        raise ValueError(f"kv_cache {kv_cache!r}: the engine's quantized pools do not store latent (MLA) attention's "
                         "[c_kv | k_pe] yet; use the full-precision pool ('auto')")
    spec = engine_spec(kv_cache, block_size)
    q_block = PagedQuantizedKVCache.bytes_per_block(config, block_size, spec)
    if num_blocks is not None:
        blocks, staging = num_blocks, min(max_num_seqs, num_blocks)
    else:
        staging = min(max_num_seqs, budget // (q_block + fp_block))
        blocks = (budget - staging * fp_block) // q_block
    _check(blocks, q_block + fp_block, kv_cache, label)
    check_fits(blocks * q_block + staging * fp_block, _what(blocks, label))
    c = config
    cache = PagedQuantizedKVCache(c.num_layers, blocks, block_size, c.num_kv_heads, c.head_dim, spec, staging,
                                  dtype, in_use)
    return Pool(cache, blocks, spec, q_block, staging)


def _what(blocks: int, label: str) -> str:
    return f"a KV pool of {blocks:,} blocks" + (f" ({label})" if label else "")


def _check(blocks: int, block_bytes: int, kv_cache, label: str) -> None:
    if blocks < 1:
        raise ValueError(f"kv_memory {label} holds no block of {block_bytes} bytes (kv_cache={kv_cache!r})")
