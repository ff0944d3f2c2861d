"""Paged KV storage and attention: vLLM's PagedAttention idea on a CPU.

All layers' keys and values live in one preallocated pool of fixed-size
blocks, ``k``/``v`` shaped (layers, kv_heads, num_blocks * block_size, d): a
token's KV sits in *slot* ``block * block_size + offset``.  Slots are the
second-to-last axis so a gathered context is already laid out
(kv_heads, batch, len, d) for a batched matmul: no transposing copies.  Which blocks a
sequence owns is the block manager's business (engine/block_manager.py);
this class only moves tensors.

A forward pass over a batch is flattened to one row of N tokens (the new
tokens of every scheduled sequence, prefill chunks and decode tokens mixed).
Before the pass, ``prepare`` receives, per sequence, how many tokens it adds
and the slots of its whole context.  In every layer ``attend`` then
1. writes the N new keys/values into their slots (before any read, so a
   sequence that shares a block filled in this same step sees it), and
2. attends: all decode tokens together (gather each context into a padded
   (batch, kv_heads, max_len, d) tensor, grouped matmul, padding masked), and
   each prefill chunk on its own with causal SDPA over its context.  Blocks
   shared by every decoding sequence (a common system prompt) are attended
   once for all of them (cascade attention) instead of once per sequence.

Values may be narrower than keys (``value_dim``); a latent (MLA) pool stores only
keys ``[c_kv | k_pe]`` and reads values as their first ``value_dim`` channels
(``values_in_keys``), so a token's latent is stored and gathered once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..model.attention import ATTENTION_DTYPE, attention, merge_partials, softmax_partial
from ..model.linear import ONEDNN_LINEAR
from . import kernels
from .base import PagedPool, PoolSizing
from .visible import AttentionWindow


@dataclass
class BatchEntry:
    """One sequence in a flattened batch: ``query_len`` new tokens ending a context of ``context_len``."""

    query_len: int
    context_len: int
    block_table: Sequence[int | None]  # None: a block released behind the window
    draft: int = 0  # how many of the last tokens are speculative drafts the engine may roll back
    window: AttentionWindow | None = None  # bounded attention (sliding window, sinks); None: the whole context


class _StepPlan:
    """Index tensors for one forward pass, built once and reused by every layer.

    Decode rows (one new token each) are collected as plain lists and turned into tensors once: either the
    compiled kernel's block tables, or (cascade over a shared prefix, or no kernel) the padded block gather
    and its mask.  A prefill chunk gets its context's slots and, with bounded attention, its mask.
    """

    def __init__(self, entries: Sequence[BatchEntry], block_size: int, dtype: torch.dtype = torch.float32,
                 use_kernel: bool = False):
        self.entries, self.block_size, self.dtype = list(entries), block_size, dtype
        self.bounded = any(e.window is not None for e in entries)  # the entries' windows replace the model's
        self.prefills: list[tuple[int, int, torch.Tensor | None, torch.Tensor | None]] = []  # q range, slots, mask
        writes: list[int] = []  # the slot of every new token, in token order
        decode_rows, self._decode = [], []  # _decode: (table, context length, window) per decode row
        start = 0
        for e in entries:
            table, first = e.block_table, e.context_len - e.query_len
            writes += [table[p // block_size] * block_size + p % block_size for p in range(first, e.context_len)]
            if e.query_len == 1:
                decode_rows.append(start)
                self._decode.append((table, e.context_len, e.window))
            elif e.context_len > e.query_len or e.window is not None:
                slots, mask = self._context(e, torch.arange(first, e.context_len))
                self.prefills.append((start, start + e.query_len, slots, mask))
            else:  # a prompt with nothing cached attends only to itself: no gather needed
                self.prefills.append((start, start + e.query_len, None, None))
            start += e.query_len
        self.num_tokens = start
        self.max_context = max(e.context_len for e in entries)
        self.write_slots = torch.tensor(writes, dtype=torch.long)
        self.decode_rows = torch.tensor(decode_rows, dtype=torch.long)
        self.all_decode = len(decode_rows) == start  # every token is a decode token, in row order
        self.shared_blocks: torch.Tensor | None = None
        self.kernel_args: tuple[torch.Tensor, ...] | None = None
        self.decode_blocks: torch.Tensor | None = None
        if decode_rows:
            self.shared = 0 if self.bounded else self._shared_prefix(block_size)
            if use_kernel and not self.shared:
                self.kernel_args = self._kernel_args(block_size)
            else:
                self.gather_plan()

    def _context(self, e: BatchEntry, new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Slots of the positions the entry's queries read, and their mask (bounded attention only)."""
        bs = self.block_size
        blocks = (e.window.visible_blocks(e.context_len - e.query_len, e.context_len, bs) if e.window is not None
                  else range(-(-e.context_len // bs)))
        offsets = torch.arange(bs)
        ids = torch.tensor([e.block_table[b] for b in blocks], dtype=torch.long)
        positions = (torch.tensor(list(blocks), dtype=torch.long)[:, None] * bs + offsets).flatten()
        kept = positions < e.context_len
        slots = (ids[:, None] * bs + offsets).flatten()[kept]
        return slots, None if e.window is None else e.window.mask(new, positions[kept])

    @property
    def contexts(self) -> list[tuple[int, int, torch.Tensor, torch.Tensor | None]]:
        """Every entry's (q_start, q_end, context slots, mask): the one-at-a-time fallback's, built on demand."""
        out, start = [], 0
        for e in self.entries:
            slots, mask = self._context(e, torch.arange(e.context_len - e.query_len, e.context_len))
            out.append((start, start + e.query_len, slots, mask))
            start += e.query_len
        return out

    def _kernel_args(self, block_size: int) -> tuple[torch.Tensor, ...]:
        """int32 (block tables, context lengths, first window positions, sinks) of the decode rows."""
        width = max(-(-n // block_size) for _, n, _ in self._decode)
        rows = [[-1 if b is None else b for b in table[: -(-n // block_size)]] for table, n, _ in self._decode]
        tables = torch.tensor([r + [-1] * (width - len(r)) for r in rows], dtype=torch.int32)
        counts = torch.tensor([n for _, n, _ in self._decode], dtype=torch.int32)
        lo = torch.tensor([max(n - w.size, 0) if w else 0 for _, n, w in self._decode], dtype=torch.int32)
        sinks = torch.tensor([w.sinks if w else 0 for _, _, w in self._decode], dtype=torch.int32)
        return tables, counts, lo, sinks

    def gather_plan(self) -> None:
        """The PyTorch decode path: whole blocks gathered (block_size x d contiguous floats per copy), padded
        to the longest table, with an additive mask for padding, unwritten slots and (bounded) invisible ones.
        The ``shared`` leading blocks common to every row are attended once for all (cascade)."""
        block_size, shared = self.block_size, self.shared
        if shared:
            self.shared_blocks = torch.tensor(self._decode[0][0][:shared], dtype=torch.long)
        lists = [w.visible_blocks(n - 1, n, block_size) if w else range(shared, -(-n // block_size))
                 for _, n, w in self._decode]
        width_blocks = max(len(b) for b in lists)
        index = torch.full((len(lists), width_blocks), -1, dtype=torch.long)
        ids = torch.zeros(len(lists), width_blocks, dtype=torch.long)
        for i, ((table, _, _), blocks) in enumerate(zip(self._decode, lists)):
            index[i, : len(blocks)] = torch.tensor(list(blocks), dtype=torch.long)
            ids[i, : len(blocks)] = torch.tensor([table[b] for b in blocks], dtype=torch.long)
        positions = (index[:, :, None] * block_size + torch.arange(block_size)).flatten(1)
        n = torch.tensor([n for _, n, _ in self._decode])[:, None]
        visible = (index[:, :, None] >= 0).expand(-1, -1, block_size).flatten(1) & (positions < n)
        for i, (_, count, w) in enumerate(self._decode):
            if w is not None:
                visible[i] &= w.mask(torch.tensor([count - 1]), positions[i])[0]
        self.decode_blocks = ids.flatten()
        self.decode_width = width_blocks * block_size
        self.decode_all_full = bool(visible.all())
        mask = torch.zeros(visible.shape, dtype=self.dtype).masked_fill_(~visible, float("-inf"))
        self.decode_mask = mask.view(len(lists), 1, -1)  # broadcasts over (kv_heads, ., group, .)

    def _shared_prefix(self, block_size: int) -> int:
        """Leading blocks common to every decode row (full blocks before each sequence's newest token)."""
        if len(self._decode) < 2:
            return 0
        limit = min((n - 1) // block_size for _, n, _ in self._decode)
        first, shared = self._decode[0][0], 0
        while shared < limit and all(t[shared] == first[shared] for t, _, _ in self._decode[1:]):
            shared += 1
        return shared


class PagedKVCache(PagedPool):
    """The full-precision pool (the model's dtype); a sliding-window model gets its own window."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, value_dim: int | None = None, values_in_keys: bool = False):
        value_dim = head_dim if value_dim is None else value_dim
        if min(num_layers, num_blocks, block_size, num_kv_heads, head_dim, value_dim) < 1:
            raise ValueError("num_layers, num_blocks, block_size, num_kv_heads, head_dim and value_dim must all "
                             "be >= 1")
        if values_in_keys and value_dim > head_dim:
            raise ValueError(f"values_in_keys needs value_dim ({value_dim}) <= head_dim ({head_dim})")
        shape = (num_layers, num_kv_heads, num_blocks * block_size, head_dim)
        self.k = torch.zeros(shape, dtype=dtype)
        self.v = None if values_in_keys else torch.zeros(shape[:3] + (value_dim,), dtype=dtype)
        self.value_dim = value_dim
        self.block_size, self.num_blocks = block_size, num_blocks
        self.block_bytes = self.nbytes // num_blocks
        self.plan: _StepPlan | None = None

    @staticmethod
    def bytes_per_block(config, block_size: int, dtype: torch.dtype = torch.float32) -> int:
        elem = torch.tensor([], dtype=dtype).element_size()
        return config.kv_values_per_token() * block_size * elem

    @classmethod
    def for_model(cls, model, num_blocks: int, block_size: int = 16) -> "PagedKVCache":
        c = model.config
        return cls(c.num_layers, num_blocks, block_size, c.cache_kv_heads, c.cache_key_dim, model.dtype,
                   c.cache_value_dim, c.values_in_keys)

    @classmethod
    def for_engine(cls, model, spec, sizing: PoolSizing) -> PagedKVCache:
        """``auto`` or the model's own dtype name; a model's own sliding window bounds its attention."""
        dtype = str(model.dtype).removeprefix("torch.")
        if spec.get("dtype") not in (None, dtype):
            raise ValueError(f"kv_cache {str(spec)!r}: the engine's full-precision pool stores the model's dtype "
                             f"({dtype}); use 'auto', or a quantized cache")
        blocks = sizing.blocks(cls.bytes_per_block(model.config, sizing.block_size, model.dtype), str(spec))
        pool = cls.for_model(model, blocks, sizing.block_size)
        own = own_window(model.config)
        pool.window = AttentionWindow(own) if own else None
        return pool

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + (self.v.nbytes if self.v is not None else 0)

    def block_tensors(self) -> dict[str, tuple[torch.Tensor, int, int]]:
        """Every stored tensor with its token axis and entries per block (what a KV tier copies)."""
        out = {"k": (self.k, 2, self.block_size)}
        if self.v is not None:
            out["v"] = (self.v, 2, self.block_size)
        return out

    def copy_blocks(self, ops) -> None:
        """Execute copy-on-write ops (``src``/``dst`` block ids) in every layer."""
        bs = self.block_size
        for op in ops:
            src, dst = slice(op.src * bs, (op.src + 1) * bs), slice(op.dst * bs, (op.dst + 1) * bs)
            self.k[:, :, dst] = self.k[:, :, src]
            if self.v is not None:
                self.v[:, :, dst] = self.v[:, :, src]

    def settle(self, still_filling) -> None:
        """After a speculative step's rollback: nothing to do here (a rejected slot is simply written again)."""

    def prepare(self, entries: Sequence[BatchEntry]) -> None:
        """Describe the next forward pass (sequences in the order their tokens are flattened)."""
        use_kernel = self.k.dtype == torch.float32 and kernels.library() is not None
        mask_dtype = ATTENTION_DTYPE.get(self.k.dtype, self.k.dtype)  # the dtype attention is computed in
        self.plan = _StepPlan(entries, self.block_size, mask_dtype, use_kernel)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               window: int | None = None) -> torch.Tensor:
        """q (1, heads, N, d), k/v (1, kv_heads, N, d) for the N flattened tokens of the planned batch."""
        plan = self.plan
        if plan is None or q.shape[2] != plan.num_tokens:
            raise RuntimeError("PagedKVCache.attend called without a matching prepare() for this batch")
        k_pool = self.k[layer]
        v_pool = self.v[layer] if self.v is not None else None  # None: values are the keys' first channels
        k_pool.index_copy_(1, plan.write_slots, k[0])
        if v_pool is not None:
            v_pool.index_copy_(1, plan.write_slots, v[0])
        if q.dtype in ATTENTION_DTYPE:  # half precision: attention computed in float32
            q, k, v = (t.to(ATTENTION_DTYPE[q.dtype]) for t in (q, k, v))
            return self._attend_written(q, k, v, k_pool, v_pool, plan, window).to(self.k.dtype)
        return self._attend_written(q, k, v, k_pool, v_pool, plan, window)

    def _attend_written(self, q, k, v, k_pool, v_pool, plan: _StepPlan, window: int | None) -> torch.Tensor:
        """Attention of the planned batch, its new keys and values already in the pool."""
        if window is not None and plan.max_context > window and not plan.bounded:
            return self._attend_each(q, k_pool, v_pool, plan, window)
        out = q.new_empty(q.shape[:3] + (self.value_dim,)) if plan.prefills else None
        for q_start, q_end, ctx, mask in plan.prefills:
            if ctx is None:
                keys, values = k[:, :, q_start:q_end], v[:, :, q_start:q_end]
            else:
                keys, values = (t.unsqueeze(0) for t in self._gather(k_pool, v_pool, ctx))
            out[:, :, q_start:q_end] = attention(q[:, :, q_start:q_end], keys, values, mask=mask)
        if len(plan.decode_rows):  # (prefill chunks went through `attention`, finite for any finite input)
            decoded = self._decode(q, k_pool, v_pool, plan)
            if decoded is None:  # the batched kernels overflowed on huge inputs: one at a time, exactly
                return self._attend_each(q, k_pool, v_pool, plan)
            if plan.all_decode:
                return decoded.unsqueeze(0)
            out[0, :, plan.decode_rows] = decoded
        return out

    def _gather(self, k_pool: torch.Tensor, v_pool: torch.Tensor | None, slots: torch.Tensor):
        """(keys, values) of ``slots``: (kv_heads, len, d) each; a latent pool's values are a view of its keys."""
        keys = _computed(k_pool.index_select(1, slots))
        return keys, (keys[..., :self.value_dim] if v_pool is None else _computed(v_pool.index_select(1, slots)))

    def _attend_each(self, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor | None, plan: _StepPlan,
                     window: int | None = None) -> torch.Tensor:
        """One sequence at a time over its gathered context, through ``attention`` (finite for any finite
        input).  Serves a sliding-window model (Mistral) past its window when the entries carry no window
        of their own (paged beam search) -- each sequence attends to its last ``window`` positions -- and
        recomputes a batch whose fast kernels overflowed."""
        out = q.new_empty(q.shape[:3] + (self.value_dim,))
        for q_start, q_end, slots, mask in plan.contexts:
            keys, values = (t[None] for t in self._gather(k_pool, v_pool, slots))
            out[:, :, q_start:q_end] = attention(q[:, :, q_start:q_end], keys, values, mask=mask,
                                                 window=None if mask is not None else window)
        return out

    def _blocks(self, k_pool: torch.Tensor, v_pool: torch.Tensor | None, blocks: torch.Tensor):
        """Whole blocks gathered at once: (keys, values), each (kv_heads, len(blocks) * block_size, d)."""
        kv_heads, num_slots, dim = k_pool.shape
        per_block = num_slots // self.block_size
        keys = _computed(k_pool.view(kv_heads, per_block, -1).index_select(1, blocks).view(kv_heads, -1, dim))
        if v_pool is None:
            return keys, keys[..., :self.value_dim]
        values = v_pool.view(kv_heads, per_block, -1).index_select(1, blocks).view(kv_heads, -1, self.value_dim)
        return keys, _computed(values)

    def _decode(self, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor | None, plan: _StepPlan
                ) -> torch.Tensor | None:
        """Attention of every decode token over its context -> (heads, batch, value_dim): the compiled kernel
        through the block tables, else a grouped matmul over the padded gathered contexts.  None if it
        overflowed."""
        batch, heads, dim, vdim = len(plan.decode_rows), q.shape[1], q.shape[3], self.value_dim
        kv_heads = k_pool.shape[0]
        group = heads // kv_heads
        if plan.kernel_args is not None and kernels.paged_usable(q, group):  # keys read in place, no gather
            rows = q[0] if plan.all_decode else q[0, :, plan.decode_rows]  # (heads, batch, d)
            qk = rows.transpose(0, 1).reshape(batch, kv_heads, group, dim)  # a view when q is (1, N, heads, d)
            out = kernels.paged_decode(qk, dim ** -0.5, k_pool, v_pool, vdim, plan.kernel_args[0], self.block_size,
                                       *plan.kernel_args[1:])
            return None if out is None else out.view(batch, heads, vdim).transpose(0, 1)
        if plan.decode_blocks is None:
            plan.gather_plan()
        width = plan.decode_width
        # (heads, batch, d) -> (kv_heads, batch, group, d): each KV head's whole group in one matmul
        qd = (q[0, :, plan.decode_rows] * dim ** -0.5).view(kv_heads, group, batch, dim).transpose(1, 2)
        keys, values = self._blocks(k_pool, v_pool, plan.decode_blocks)
        keys, values = keys.view(kv_heads, batch, width, dim), values.view(kv_heads, batch, width, vdim)
        scores = torch.matmul(qd, keys.transpose(-1, -2))  # (kv_heads, batch, group, width)
        if not plan.decode_all_full:
            scores = scores + plan.decode_mask
        if plan.shared_blocks is None:
            out = torch.matmul(torch.softmax(scores, dim=-1), values)  # (kv_heads, batch, group, vdim)
            return _finite_or_none(out.transpose(1, 2).reshape(heads, batch, vdim))
        # Cascade attention (as in FlashInfer / vLLM): every query against the shared prefix in one
        # matmul that reads the prefix once, each query against its own suffix, then the two partial
        # softmaxes are merged through their maxima and sums.
        shared_k, shared_v = self._blocks(k_pool, v_pool, plan.shared_blocks)
        s1 = _heads_matmul(qd.reshape(kv_heads, batch * group, dim), shared_k).view(kv_heads, batch, group, -1)
        m1 = s1.amax(-1, keepdim=True)
        e1 = torch.exp(s1 - m1)
        o1 = _heads_matmul(e1.view(kv_heads, batch * group, -1), shared_v.transpose(-1, -2))
        shared = (o1.view(kv_heads, batch, group, vdim), m1, e1.sum(-1, keepdim=True))
        out = merge_partials([shared, softmax_partial(scores, values)])
        return _finite_or_none(out.transpose(1, 2).reshape(heads, batch, vdim))


def _computed(t: torch.Tensor) -> torch.Tensor:
    """A gathered copy in the dtype attention is computed in (float32 for a half-precision pool)."""
    return t.to(ATTENTION_DTYPE.get(t.dtype, t.dtype))


def own_window(config) -> int | None:
    """A sliding-window model's window (None when it covers the whole context)."""
    window = config.sliding_window
    return window if window and window < config.max_positions else None


def _finite_or_none(out: torch.Tensor) -> torch.Tensor | None:
    """``out``, or None if a fast kernel overflowed (inf or nan) and the batch must be recomputed exactly."""
    return out if torch.isfinite(out).all() else None


def _heads_matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (H, M, K) times w (H, N, K) transposed, per head -> (H, M, N).

    A batched matmul runs each head's product on one thread, so with fewer
    heads than twice the threads (Llama-135M's 3 KV heads on 2 cores) a core
    idles half the time; oneDNN's linear threads each product instead.
    Measured here for 3 heads, M=96, 1,024 shared tokens: 146 vs 254 us (q.K)
    and 127 vs 251 us (p.V).  With many heads the batched matmul stays.
    """
    if not ONEDNN_LINEAR or x.shape[0] >= 2 * torch.get_num_threads() or x.dtype != torch.float32:
        return torch.matmul(x, w.transpose(-1, -2))
    return torch.stack([torch.ops.mkldnn._linear_pointwise(x[h], w[h], None, "none", [], "")
                        for h in range(x.shape[0])])
