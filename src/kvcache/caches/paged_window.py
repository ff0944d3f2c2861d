"""The engine's pool for ``window:size=W,sinks=S``: the full-precision pool with bounded attention.

Every query reads its sinks and its last ``W`` positions (caches/visible.py), and the engine gives the
blocks behind the window back to the pool, so a long request holds bounded memory.  A sliding-window
model's own window narrows ``W`` when it is smaller.  The single-stream equal is
``window:size=W,sinks=S,positions=absolute`` (``pool.spec``).
"""

from __future__ import annotations

from .base import PoolSizing
from .paged import PagedKVCache, own_window
from .visible import AttentionWindow
from .window import default_size


class WindowedPagedKVCache(PagedKVCache):
    @classmethod
    def for_engine(cls, model, spec, sizing: PoolSizing) -> WindowedPagedKVCache:
        text = str(spec)
        if spec.get("positions", "absolute") != "absolute":
            raise ValueError(f"kv_cache {text!r}: the engine keeps the model's own (absolute) positions; "
                             "positions=cache (streaming past the model's context) is single-stream generate's")
        if "margin" in spec.given:
            raise ValueError(f"kv_cache {text!r}: margin is single-stream crop's; the engine rolls speculative "
                             "drafts back before it releases any block")
        if model.config.mla is not None:
            raise ValueError(f"kv_cache {text!r}: the window does not bound latent (MLA) attention yet")
        own = own_window(model.config)
        size, sinks = spec.get("size") or default_size(model.config), spec.get("sinks", 0)
        size = min(size, own) if own else size
        blocks = sizing.blocks(cls.bytes_per_block(model.config, sizing.block_size, model.dtype), text)
        pool = cls.for_model(model, blocks, sizing.block_size)
        pool.window = AttentionWindow(size, sinks)
        pool.spec = f"window:size={size},sinks={sinks},positions=absolute"
        return pool
