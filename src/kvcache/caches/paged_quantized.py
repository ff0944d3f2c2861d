"""The engine's paged pool stored in 8 or 4 bits: quantized blocks, and the block being filled in full precision.

Same interface as :class:`~kvcache.caches.paged.PagedKVCache` (``prepare`` a
flattened batch, ``attend`` per layer, ``copy_blocks``), same slots (token
``o`` of block ``b`` is slot ``b * block_size + o``), same block manager.
What differs is what a block holds:

* A **full** block is stored once, quantized (codes and float16 scales in a
  :class:`~kvcache.caches.quant_store.QuantizedStore` with one row: a block
  of 16 tokens is one kernel tile).  It is quantized in the forward pass that
  fills it, from its full-precision keys and values, and never again, so a
  block reached through the prefix cache or after copy-on-write reads exactly
  as it was written.
* A **partial** block (each live sequence's last) lives in a full-precision
  *staging* slot until the pass that fills it.  Slots belong to block ids and
  are reclaimed when their block is freed (``in_use``).

A query at position ``p`` reads every block before its own quantized and its
own block in full precision -- exactly what the single-stream
:class:`~kvcache.caches.quantized.QuantizedKVCache` does with ``residual=0``
and ``block=block_size`` (:func:`engine_spec` names that spec), so the engine
and ``generate`` quantize identically whatever the batch.  Decode runs the
compiled kernel over each sequence's tile table; prefill chunks and the
fallbacks use PyTorch on the dequantized context of one sequence at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..model.attention import attention, merge_partials, softmax_partial
from . import kernels
from .base import PagedPool, PoolSizing
from .paged import BatchEntry, PagedKVCache
from .prefill_view import prefill_attention, view_masks
from .quant_ops import TILE, QuantizedRows, dequantize_rows, hadamard, quantize, quantized_partial
from .quant_store import QuantizedStore
from .quantized import QuantizedKVCache, check_range, compute_dtype
from .registry import CacheSpec


def engine_spec(spec: str | CacheSpec, block_size: int) -> str:
    """The single-stream spec equal to ``spec`` in an engine of ``block_size``-token blocks, every option explicit."""
    return str(engine_options(CacheSpec.parse(spec), block_size))


def engine_options(spec: CacheSpec, block_size: int) -> CacheSpec:
    """``spec`` as the engine stores it: only the block being filled in full precision (``residual=0``,
    ``block=block_size``, no sinks) and KIVI keys grouped over one block; anything else given is refused."""
    text = str(spec)
    if not issubclass(spec.type.cache_class(), QuantizedKVCache):
        raise ValueError(f"cache {spec.name!r} is not a quantized cache")
    for key, allowed in (("residual", 0), ("sinks", 0), ("block", block_size)):
        if key in spec.given and spec.options[key] != allowed:
            raise ValueError(f"kv_cache {text!r}: the engine keeps only the block being filled in full precision, "
                             f"so {key} must be {allowed} here (got {spec.options[key]}); {key} is a single-stream "
                             "option")
    bits = spec.options["bits"]
    keys = spec.get("keys") or ("channel" if bits == 4 else "token")
    group = spec.get("group", block_size if keys == "channel" else QuantizedKVCache.options["group"].default)
    if keys == "channel" and block_size % group:
        raise ValueError(f"kv_cache {text!r}: keys=channel groups tokens within a block, so group ({group}) must "
                         f"divide the block size ({block_size})")
    value_group = spec.get("value_group", 32 if keys == "channel" else group)
    options = {"keys": keys, "group": group, "value_group": value_group, "residual": 0, "block": block_size}
    options.update({k: bool(spec.options[k]) for k in ("symmetric", "rotate") if spec.get(k)})
    if spec.get("kernel") is False:
        options["kernel"] = False
    return CacheSpec(spec.name, {**spec.type.fixed, **options}, tuple(options))


class _Plan:
    """Per-step index tensors: where each touched block's full-precision rows come from and where they go."""

    def __init__(self, entries: Sequence[BatchEntry], bs: int, slot_of: Callable[[int], int]):
        fresh_new_dst, fresh_head_dst, head_src = [], [], []
        self.done_fresh, self.done_blocks, self.stage_fresh, self.stage_slots = [], [], [], []
        self.held: list[int] = []  # blocks filled by speculative drafts: staged until the engine settles
        self.decode_rows, self.decode_fresh, self.decode_fp, self.decode_tables = [], [], [], []
        self.prefills: list[tuple[int, int, int, list[int], int]] = []  # (q_start, q_end, first fresh, blocks, s)
        self.each: list[tuple[int, int, int, list[int], int]] = []
        start = fresh = 0
        for e in entries:
            s, end = e.context_len - e.query_len, e.context_len
            table = list(e.block_table)
            b0, b1 = s // bs, (end - 1) // bs
            first = fresh
            fresh_new_dst.extend(first * bs + p - b0 * bs for p in range(s, end))
            if s % bs:  # the block it continues: its earlier tokens wait in staging
                fresh_head_dst.extend(first * bs + o for o in range(s % bs))
                head_src.extend(slot_of(table[b0]) * bs + o for o in range(s % bs))
            for b in range(b0, b1 + 1):
                if (b + 1) * bs <= end:
                    self.done_fresh.append(fresh)
                    self.done_blocks.append(table[b])
                    if (b + 1) * bs > end - e.draft:  # filled by drafts: keep its rows in case they are rejected
                        self.held.append(table[b])
                        self.stage_fresh.append(fresh)
                        self.stage_slots.append(slot_of(table[b]))
                else:
                    self.stage_fresh.append(fresh)
                    self.stage_slots.append(slot_of(table[b]))
                fresh += 1
            item = (start, start + e.query_len, first, table, s)
            self.each.append(item)
            if e.query_len == 1:
                self.decode_rows.append(start)
                self.decode_fresh.append(first)
                self.decode_fp.append(end - b1 * bs)
                self.decode_tables.append(table[:b1])
            else:
                self.prefills.append(item)
            start += e.query_len
        self.num_tokens, self.num_fresh, self.block_size = start, fresh, bs
        self.masks: dict = {}  # prefill masks, built by the first layer
        long = torch.long
        self.fresh_new_dst = torch.tensor(fresh_new_dst, dtype=long)
        self.fresh_head_dst = torch.tensor(fresh_head_dst, dtype=long)
        self.head_src = torch.tensor(head_src, dtype=long)
        offsets = torch.arange(bs)
        self.done_rows = (torch.tensor(self.done_fresh, dtype=long)[:, None] * bs + offsets).flatten()
        self.stage_rows = (torch.tensor(self.stage_fresh, dtype=long)[:, None] * bs + offsets).flatten()
        self.stage_dst = (torch.tensor(self.stage_slots, dtype=long)[:, None] * bs + offsets).flatten()
        if self.decode_rows:
            tiles = bs // TILE
            width = max(1, max(len(t) for t in self.decode_tables) * tiles)
            self.tiles = torch.zeros(len(self.decode_rows), width, dtype=torch.int32)
            for i, t in enumerate(self.decode_tables):
                if t:
                    self.tiles[i, : len(t) * tiles] = (torch.tensor(t)[:, None] * tiles + torch.arange(tiles)).flatten()
            self.counts = torch.tensor([len(t) * bs for t in self.decode_tables], dtype=torch.int32)
            self.fp_counts = torch.tensor(self.decode_fp, dtype=torch.int32)
            self.decode_index = torch.tensor(self.decode_rows, dtype=long)
            self.decode_fresh_index = torch.tensor(self.decode_fresh, dtype=long)


class PagedQuantizedKVCache(PagedPool):
    """The int8 / int4 pool: ``spec`` is the single-stream spec it equals (``engine_spec``)."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 spec: str | CacheSpec, staging_blocks: int, dtype: torch.dtype = torch.float32,
                 in_use: Callable[[int], bool] | None = None):
        spec = CacheSpec.parse(spec)
        probe = QuantizedKVCache(1, 1, head_dim, capacity=1, dtype=dtype, **spec.options)  # checks options
        if block_size % TILE or (probe.key_fmt.per_channel and block_size % probe.key_fmt.group):
            raise ValueError(f"a quantized pool needs blocks of a multiple of {TILE} tokens (and of the key group), "
                             f"got block_size={block_size}")
        self.spec, self.key_fmt, self.value_fmt = str(spec), probe.key_fmt, probe.value_fmt
        self.compute_dtype = probe.compute_dtype  # float32 for half-precision models, as the single-stream cache
        self.rotation = hadamard(head_dim, self.compute_dtype) if probe.rotation is not None else None
        self.use_kernel = probe.use_kernel
        self.block_size, self.num_blocks, self.dtype = block_size, num_blocks, dtype
        self.store = QuantizedStore(num_layers, 1, num_kv_heads, head_dim, self.key_fmt, self.value_fmt,
                                    num_blocks * block_size)
        shape = (num_layers, num_kv_heads, max(1, staging_blocks) * block_size, head_dim)
        self.stage_k, self.stage_v = (torch.zeros(shape, dtype=self.compute_dtype) for _ in range(2))
        self.slots: dict[int, int] = {}  # block id -> staging slot
        self.free_slots = list(range(max(1, staging_blocks)))[::-1]
        self.in_use = in_use or (lambda block: True)
        self.staging_blocks = staging_blocks
        self.block_bytes = self.store.nbytes // num_blocks  # codes and scales (the staging slots apart)
        self.plan: _Plan | None = None

    @classmethod
    def for_engine(cls, model, spec: CacheSpec, sizing: PoolSizing) -> PagedQuantizedKVCache:
        """Blocks and staging slots from the budget: each running sequence fills one block at a time."""
        c, bs = model.config, sizing.block_size
        if c.mla is not None:
            raise ValueError(f"kv_cache {str(spec)!r}: the engine's quantized pools do not store latent (MLA) "
                             "attention's [c_kv | k_pe] yet; use the full-precision pool ('auto')")
        single = engine_options(spec, bs)
        fp_block = PagedKVCache.bytes_per_block(c, bs, compute_dtype(model.dtype))  # a staging slot
        q_block = cls.bytes_per_block(c, bs, single)
        if sizing.num_blocks is not None:
            blocks, staging = sizing.num_blocks, min(sizing.max_num_seqs, sizing.num_blocks)
        else:
            staging = min(sizing.max_num_seqs, sizing.budget // (q_block + fp_block))
            blocks = (sizing.budget - staging * fp_block) // q_block
        sizing.check(blocks, q_block + fp_block, blocks * q_block + staging * fp_block, str(spec))
        return cls(c.num_layers, blocks, bs, c.num_kv_heads, c.head_dim, single, staging, model.dtype, sizing.in_use)

    @staticmethod
    def bytes_per_block(config, block_size: int, spec: str | CacheSpec) -> int:
        """Codes and scales of one block, every layer (the staging slots are counted apart)."""
        probe = QuantizedKVCache(1, 1, config.head_dim, capacity=1, **CacheSpec.parse(spec).options)
        store = QuantizedStore(config.num_layers, 1, config.num_kv_heads, config.head_dim, probe.key_fmt,
                               probe.value_fmt, block_size)
        return store.nbytes

    @property
    def nbytes(self) -> int:
        return self.store.nbytes + self.stage_k.nbytes + self.stage_v.nbytes

    # --- staging slots -------------------------------------------------------
    def _slot(self, block: int) -> int:
        if block not in self.slots:
            if not self.free_slots:
                self._reclaim()
            self.slots[block] = self.free_slots.pop()
        return self.slots[block]

    def _reclaim(self) -> None:
        """Slots of freed blocks go back; if every slot is live (more partial blocks than reserved), grow."""
        for block in [b for b in self.slots if not self.in_use(b)]:
            self.free_slots.append(self.slots.pop(block))
        if not self.free_slots:
            n = self.stage_k.shape[2] // self.block_size
            self.stage_k, self.stage_v = (torch.cat((t, torch.zeros_like(t)), 2) for t in (self.stage_k, self.stage_v))
            self.free_slots = list(range(2 * n - 1, n - 1, -1))

    def _release(self, blocks: Sequence[int]) -> None:
        for block in blocks:
            if block in self.slots:
                self.free_slots.append(self.slots.pop(block))

    # --- the step ------------------------------------------------------------
    def copy_blocks(self, ops) -> None:
        """Copy-on-write: a block's stored codes and, for a partial block, its staging rows."""
        bs = self.block_size
        for op in ops:
            for name, t in self.store.tensors.items():
                unit = self._unit(name)
                src, dst = slice(op.src * unit, (op.src + 1) * unit), slice(op.dst * unit, (op.dst + 1) * unit)
                t[:, :, :, dst] = t[:, :, :, src]
            if op.src in self.slots:
                src, dst = self.slots[op.src] * bs, self._slot(op.dst) * bs
                for t in (self.stage_k, self.stage_v):
                    t[:, :, dst:dst + bs] = t[:, :, src:src + bs]

    def block_tensors(self) -> dict[str, tuple[torch.Tensor, int, int]]:
        """The stored codes and scales with their token axis and entries per block (a full block's are final
        once its step settled; what a KV tier copies, as they are)."""
        return {name: (t, 3, self._unit(name)) for name, t in self.store.tensors.items()}

    def _unit(self, name: str) -> int:
        """Entries of store tensor ``name`` per block along its token axis."""
        if name in ("kc",) or (name in ("ks", "ko") and not self.key_fmt.per_channel):
            return self.block_size // TILE
        if name in ("ks", "ko"):
            return self.block_size // self.key_fmt.group
        return self.block_size

    def _index(self, name: str, blocks: Sequence[int]) -> torch.Tensor:
        """Positions of ``blocks``' entries along store tensor ``name``'s token axis, in block order."""
        unit = self._unit(name)
        return (torch.as_tensor(list(blocks), dtype=torch.long)[:, None] * unit + torch.arange(unit)).flatten()

    def prepare(self, entries: Sequence[BatchEntry]) -> None:
        plan = _Plan(entries, self.block_size, self._slot)
        held = set(plan.held)  # filled in this pass: stored quantized, slot free next step (drafted: on settle)
        self._release([b for b in plan.done_blocks if b not in held])
        self.plan = plan

    def settle(self, still_filling) -> None:
        """After a speculative step: blocks drafts filled are final unless the rollback left them partial
        (``still_filling``), which keep their full-precision rows until they fill again."""
        if self.plan is not None:
            self._release([b for b in self.plan.held if b not in still_filling])

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               window: int | None = None) -> torch.Tensor:
        plan = self.plan
        if plan is None or q.shape[2] != plan.num_tokens:
            raise RuntimeError("PagedQuantizedKVCache.attend called without a matching prepare() for this batch")
        dtype = q.dtype
        q, k, v = (t.to(self.compute_dtype) for t in (q, k, v))
        return self._attend(layer, q, k, v, plan, window).to(dtype)

    def _attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: _Plan,
                window: int | None) -> torch.Tensor:
        if self.rotation is not None:
            q, k = q @ self.rotation, k @ self.rotation
        check_range(k, v)
        fresh_k, fresh_v = self._fresh(layer, k[0], v[0], plan)
        self._store_done(layer, fresh_k, fresh_v, plan)
        for stage, fresh in ((self.stage_k, fresh_k), (self.stage_v, fresh_v)):
            stage[layer].index_copy_(1, plan.stage_dst, fresh.index_select(1, plan.stage_rows))
        if window is not None:
            return self._attend_each(layer, q, fresh_k, fresh_v, plan, window)
        out = torch.empty_like(q)
        for q_start, q_end, first, table, s in plan.prefills:
            out[:, :, q_start:q_end] = self._prefill(layer, q[:, :, q_start:q_end], fresh_k, fresh_v, first, table, s)
        if plan.decode_rows:
            out[0, :, plan.decode_index] = self._decode(layer, q, fresh_k, fresh_v, plan)
        if not torch.isfinite(out).all():
            return self._attend_each(layer, q, fresh_k, fresh_v, plan)
        return out

    def _fresh(self, layer: int, k: torch.Tensor, v: torch.Tensor, plan: _Plan):
        """Full-precision rows of every block this pass touches (kv_heads, blocks * block_size, d)."""
        out = []
        for new, stage in ((k, self.stage_k[layer]), (v, self.stage_v[layer])):
            fresh = new.new_zeros(new.shape[0], plan.num_fresh * self.block_size, new.shape[2])
            fresh.index_copy_(1, plan.fresh_new_dst, new)
            if len(plan.head_src):
                fresh.index_copy_(1, plan.fresh_head_dst, stage.index_select(1, plan.head_src))
            out.append(fresh)
        return out

    def _store_done(self, layer: int, fresh_k: torch.Tensor, fresh_v: torch.Tensor, plan: _Plan) -> None:
        """Quantize the blocks this pass fills, once, into their place in the store."""
        if not plan.done_blocks:
            return
        keys, values = fresh_k.index_select(1, plan.done_rows)[None], fresh_v.index_select(1, plan.done_rows)[None]
        codes = dict(zip(("kc", "ks", "ko"), quantize(keys, self.key_fmt)))
        codes.update(zip(("vc", "vs", "vo"), quantize(values, self.value_fmt)))
        for name, t in self.store.tensors.items():
            c = codes[name]
            if name == "kc" or (name in ("ks", "ko") and not self.key_fmt.per_channel):
                c = c.reshape(*c.shape[:2], -1, TILE, c.shape[-1]).transpose(-1, -2)  # token rows -> tiles
            t[layer].index_copy_(2, self._index(name, plan.done_blocks), c)

    def _rows(self, layer: int, blocks: Sequence[int]) -> QuantizedRows:
        """The stored codes of ``blocks``, in order, as one contiguous run (one sequence's quantized context)."""
        picked = [t.index_select(2, self._index(name, blocks))
                  for name, t in zip(("kc", "ks", "ko", "vc", "vs", "vo"), self.store.layer(layer))]
        return QuantizedRows(*picked, count=len(blocks) * self.block_size)

    def _decode(self, layer: int, q: torch.Tensor, fresh_k, fresh_v, plan: _Plan) -> torch.Tensor:
        """Every decode token over its quantized blocks and its own block's rows -> (heads, batch, d)."""
        heads, dim = q.shape[1], q.shape[3]
        kv_heads, batch = fresh_k.shape[0], len(plan.decode_rows)
        qg = (q[0, :, plan.decode_index] * dim ** -0.5).view(kv_heads, heads // kv_heads, batch, dim)
        qg = qg.permute(2, 0, 1, 3).contiguous()  # (batch, kv_heads, group, d)
        bs = self.block_size
        fk, fv = (f.view(kv_heads, -1, bs, dim).index_select(1, plan.decode_fresh_index).transpose(0, 1).contiguous()
                  for f in (fresh_k, fresh_v))
        if self.use_kernel and kernels.usable(qg):
            out = kernels.quant_decode(qg, *self.store.layer(layer), plan.counts, self.key_fmt.bits,
                                       self.key_fmt.group, self.value_fmt.group, self.key_fmt.per_channel,
                                       fk, fv, plan.fp_counts, tiles=plan.tiles)
        else:
            out = torch.empty_like(qg)
            for i, table in enumerate(plan.decode_tables):
                n = plan.decode_fp[i]
                parts = [softmax_partial(qg[i:i + 1] @ fk[i:i + 1, :, :n].transpose(-1, -2), fv[i:i + 1, :, :n])]
                if table:
                    parts.append(quantized_partial(qg[i:i + 1], self._rows(layer, table), self.key_fmt,
                                                   self.value_fmt))
                out[i] = merge_partials(parts)[0]
        return out.permute(1, 2, 0, 3).reshape(heads, batch, dim)

    def _parts(self, layer: int, fresh_k, fresh_v, first: int, table: list[int], s: int, end: int,
               quantized_blocks: int, dtype: torch.dtype):
        """One sequence's keys/values in two parts: its first ``quantized_blocks`` blocks dequantized (None if
        none), and the full-precision rows of the blocks this pass touches (from ``s``'s block up to ``end``)."""
        bs = self.block_size
        rows = slice(first * bs, first * bs + end - s // bs * bs)
        dq_k = dq_v = None
        if quantized_blocks:
            dq_k, dq_v = dequantize_rows(self._rows(layer, table[:quantized_blocks]), self.key_fmt, self.value_fmt,
                                         dtype)
        return dq_k, dq_v, fresh_k[None, :, rows], fresh_v[None, :, rows]

    def _prefill(self, layer: int, q: torch.Tensor, fresh_k, fresh_v, first: int, table: list[int], s: int):
        """A chunk's queries, each with the decode-equivalent view (prefill_view.py): blocks before its own
        dequantized, its own block in full precision (causally)."""
        bs, n = self.block_size, q.shape[2]
        quantized_blocks = (s + n - 1) // bs
        parts = self._parts(layer, fresh_k, fresh_v, first, table, s, s + n, quantized_blocks, q.dtype)
        key = (s, n, q.dtype)
        if key not in self.plan.masks:  # the same for every layer: built once per step
            self.plan.masks[key] = view_masks(s, n, bs, quantized_blocks * bs, q.dtype)
        return prefill_attention(q, *parts, s, bs, self.plan.masks[key])

    def _attend_each(self, layer: int, q: torch.Tensor, fresh_k, fresh_v, plan: _Plan,
                     window: int | None = None) -> torch.Tensor:
        """One sequence at a time over its stored forms through ``attention`` (finite for any finite input):
        sliding-window models past their window (decode reads exactly what ``generate`` reads), and batches
        whose fast paths overflowed."""
        out = torch.empty_like(q)
        for q_start, q_end, first, table, s in plan.each:
            dq_k, dq_v, fp_k, fp_v = self._parts(layer, fresh_k, fresh_v, first, table, s, s + q_end - q_start,
                                                 s // self.block_size, q.dtype)
            keys = fp_k if dq_k is None else torch.cat((dq_k, fp_k), 2)
            values = fp_v if dq_v is None else torch.cat((dq_v, fp_v), 2)
            out[:, :, q_start:q_end] = attention(q[:, :, q_start:q_end], keys, values, window=window)
        return out
