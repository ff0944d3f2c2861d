"""The engine's KV pool, chosen by a cache spec and sized from a memory budget.

``kv_cache=None`` / ``"auto"`` (or the model's own dtype name) is the
full-precision :class:`~kvcache.caches.paged.PagedKVCache`; a quantized spec
(``"int8"``, ``"int4"``, ``"int4:rotate=1"``) is the
:class:`~kvcache.caches.paged_quantized.PagedQuantizedKVCache`, whose budget
holds the quantized blocks plus one full-precision staging block per
sequence that can run at once (``max_num_seqs``, and never more than the
blocks themselves): each running sequence fills one block at a time.

``"window:size=W,sinks=S"`` is the full-precision pool with bounded attention
(caches/visible.py): every query reads its sinks and its last ``W``
positions, and blocks behind the window go back to the pool, so a long
request holds bounded memory.  A sliding-window model (Mistral) gets its own
window this way without asking; a smaller ``size`` narrows it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..caches.base import parse_spec
from ..caches.paged import PagedKVCache
from ..caches.paged_quantized import PagedQuantizedKVCache, engine_spec
from ..caches.visible import AttentionWindow
from ..caches.window import default_size
from ..runtime import check_fits

FULL_PRECISION = ("auto", "fp32", "fp64", "fp16", "bf16")  # registry names whose `dtype` must be the model's


@dataclass
class Pool:
    cache: PagedKVCache | PagedQuantizedKVCache
    num_blocks: int
    spec: str  # the single-stream spec that quantizes exactly as this pool ("auto" for full precision)
    block_bytes: int  # one block, every layer (quantized: codes and scales)
    staging_blocks: int  # full-precision blocks for the blocks being filled (0 for a full-precision pool)
    window: AttentionWindow | None = None  # bounded attention: blocks behind it are released


def make_pool(model, kv_cache: str | None, budget: int | None, num_blocks: int | None, block_size: int,
              max_num_seqs: int, in_use: Callable[[int], bool], label: str = "") -> Pool:
    """A pool of ``num_blocks`` blocks, or as many as ``budget`` bytes hold (``label`` names the budget in
    errors)."""
    config, dtype = model.config, model.dtype
    fp_block = PagedKVCache.bytes_per_block(config, block_size, dtype)
    name, options = parse_spec("auto" if kv_cache is None else kv_cache)
    own = config.sliding_window if config.sliding_window and config.sliding_window < config.max_positions else None
    if name == "window":
        window, spec = _window(model, kv_cache, options, own)
        blocks = num_blocks if num_blocks is not None else budget // fp_block
        _check(blocks, fp_block, kv_cache, label)
        check_fits(blocks * fp_block, _what(blocks, label))
        return Pool(PagedKVCache.for_model(model, blocks, block_size), blocks, spec, fp_block, 0, window)
    if name in FULL_PRECISION:
        if options.get("dtype") not in (None, str(dtype).removeprefix("torch.")):
            raise ValueError(f"kv_cache {kv_cache!r}: the engine's full-precision pool stores the model's dtype "
                             f"({str(dtype).removeprefix('torch.')}); use 'auto', or a quantized cache")
        blocks = num_blocks if num_blocks is not None else budget // fp_block
        _check(blocks, fp_block, kv_cache, label)
        check_fits(blocks * fp_block, _what(blocks, label))
        window = AttentionWindow(own) if own else None  # a sliding-window model's own window
        return Pool(PagedKVCache.for_model(model, blocks, block_size), blocks, "auto", fp_block, 0, window)
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


def _window(model, kv_cache: str, options: dict, own: int | None) -> tuple[AttentionWindow, str]:
    """The engine's bounded attention from a ``window:...`` spec, and the single-stream spec equal to it."""
    if options.get("positions", "absolute") != "absolute":
        raise ValueError(f"kv_cache {kv_cache!r}: the engine keeps the model's own (absolute) positions; "
                         "positions=cache (streaming past the model's context) is single-stream generate's")
    if "margin" in options:
        raise ValueError(f"kv_cache {kv_cache!r}: margin is single-stream crop's; the engine rolls speculative "
                         "drafts back before it releases any block")
    if model.config.mla is not None:
        raise ValueError(f"kv_cache {kv_cache!r}: the window does not bound latent (MLA) attention yet")
    size, sinks = options.get("size") or default_size(model.config), options.get("sinks", 0)
    size = min(size, own) if own else size
    return AttentionWindow(size, sinks), f"window:size={size},sinks={sinks},positions=absolute"


def _what(blocks: int, label: str) -> str:
    return f"a KV pool of {blocks:,} blocks" + (f" ({label})" if label else "")


def _check(blocks: int, block_bytes: int, kv_cache, label: str) -> None:
    if blocks < 1:
        raise ValueError(f"kv_memory {label} holds no block of {block_bytes} bytes (kv_cache={kv_cache!r})")
