"""The compiled decode attention kernels: the quantized cache's, and the engine's full-precision paged pool's
(keys read through the block tables, no gathered copy).  The C source (qattn.c) is built and loaded by
``native.py``; without it the callers take their PyTorch paths.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from .. import native

SOURCE = Path(__file__).with_name("qattn.c")


def library() -> ctypes.CDLL | None:
    """The loaded kernel library, building it the first time; None (after one notice) if it cannot be built."""
    lib = native.load(SOURCE, "quantized-cache kernel")
    if lib is not None and lib.kv_quant_decode.argtypes is None:
        lib.kv_quant_decode.restype = ctypes.c_int
        ptr, num = ctypes.c_void_p, ctypes.c_int
        lib.kv_quant_decode.argtypes = [ptr] * 7 + [num] * 9 + [ptr, num, ptr, ptr, ptr, ptr, num, ptr]
        lib.kv_paged_decode.restype = ctypes.c_int
        lib.kv_paged_decode.argtypes = [ptr, ctypes.c_float, ptr, ptr] + [num] * 6 + [ctypes.c_long, ptr, num, num,
                                                                                   ptr, ptr, ptr, ptr]
    return lib


def fits(head_dim: int, key_fmt, value_fmt) -> bool:
    """The kernel's static limits: head_dim and groups multiples of 16, head_dim <= 128 and at most 16 groups
    per row, per-token key groups equal to the value groups (per call it also needs float32 queries and at
    most 64 query heads per KV head)."""
    kg, vg = key_fmt.group, value_fmt.group
    return (head_dim % 16 == 0 and kg % 16 == 0 and vg % 16 == 0 and head_dim <= 128 and head_dim // vg <= 16
            and (key_fmt.per_channel or (kg == vg and head_dim // kg <= 16)))


def usable(qg: torch.Tensor) -> bool:
    """The per-call limits, for a cache whose shapes ``fits``: float32 queries, at most 64 per KV head, and
    a library that built."""
    return qg.dtype == torch.float32 and qg.shape[2] <= 64 and library() is not None


def _int32(values, batch: int) -> torch.Tensor:
    if isinstance(values, int):
        return torch.full((batch,), values, dtype=torch.int32)
    return torch.as_tensor(values, dtype=torch.int32).contiguous()


def quant_decode(qg: torch.Tensor, k_codes, k_scale, k_offset, v_codes, v_scale, v_offset, counts, bits: int,
                 key_group: int, value_group: int, per_channel: bool, full_k: torch.Tensor | None = None,
                 full_v: torch.Tensor | None = None, full_counts=0, tiles: torch.Tensor | None = None) -> torch.Tensor:
    """Decode attention of fp32 queries qg (B, H, G, D) (scaled) over ``counts`` stored tokens of one layer and
    ``full_counts`` full-precision ones per sequence (ints, or one per sequence): the normalised output (B, H, G, D).

    The storage tensors are one layer's: key codes and per-token key scales as tiles (S, H, capacity/16, W, 16),
    per-channel key scales (S, H, capacity/key_group, D), values (S, H, capacity, W).  Contiguous (``tiles``
    None): S = B, row b holds sequence b.  Paged: S = 1, and ``tiles`` (B, max_tiles) gives the physical tile of
    each sequence's logical tile.  ``full_k``/``full_v`` (B, H, full capacity, D) float32.  With per-token keys
    ``key_group`` must equal ``value_group``.
    """
    lib = library()
    assert lib is not None, "quant_decode called without a kernel"
    batch, heads, group_q, dim = qg.shape
    assert per_channel or key_group == value_group, "per-token key groups must equal the value groups"
    out = torch.empty_like(qg)
    counts, full_counts = _int32(counts, batch), _int32(full_counts, batch)
    has_full = full_k is not None and int(full_counts.max()) > 0
    tiles = None if tiles is None else tiles.to(torch.int32).contiguous()
    status = lib.kv_quant_decode(
        qg.data_ptr(), k_codes.data_ptr(), k_scale.data_ptr(), k_offset.data_ptr(), v_codes.data_ptr(),
        v_scale.data_ptr(), v_offset.data_ptr(), batch, heads, group_q, dim, v_codes.shape[-2], bits, key_group,
        value_group, int(per_channel), None if tiles is None else tiles.data_ptr(),
        0 if tiles is None else tiles.shape[1], counts.data_ptr(), full_k.data_ptr() if has_full else None,
        full_v.data_ptr() if has_full else None, full_counts.data_ptr(), full_k.shape[2] if has_full else 0,
        out.data_ptr())
    if status == 1:
        raise MemoryError("the quantized-cache kernel could not allocate its partials")
    if status != 0:
        raise ValueError("quant_decode: nothing to attend to (no stored and no full-precision token)")
    return out


def paged_usable(q: torch.Tensor, group: int) -> bool:
    """The paged kernel's limits: float32, at most 64 query heads per KV head, and a library that built."""
    return q.dtype == torch.float32 and group <= 64 and library() is not None


def paged_decode(qg: torch.Tensor, scale: float, k_pool: torch.Tensor, v_pool: torch.Tensor | None, value_dim: int,
                 tables: torch.Tensor, block_size: int, counts: torch.Tensor, lo: torch.Tensor,
                 sinks: torch.Tensor) -> torch.Tensor | None:
    """Decode attention of fp32 queries qg (B, H, G, D) times ``scale`` over one layer's pool k_pool (H, slots, D),
    v_pool (H, slots, value_dim) (None: values are the keys' first ``value_dim`` channels): sequence b reads
    positions j < counts[b] with j < sinks[b] or j >= lo[b], token j in slot tables[b, j // block_size] *
    block_size + j % block_size.  int32 tables (B, max_blocks), counts, lo, sinks (B,).  Returns (B, H, G,
    value_dim), or None when the output overflowed (huge inputs): the caller recomputes it exactly."""
    lib = library()
    assert lib is not None, "paged_decode called without a kernel"
    batch, heads, group, dim = qg.shape
    qg = qg.contiguous()
    out = qg.new_empty(batch, heads, group, value_dim)
    values, stride = (k_pool, dim) if v_pool is None else (v_pool, v_pool.shape[-1])
    status = lib.kv_paged_decode(qg.data_ptr(), scale, k_pool.data_ptr(), values.data_ptr(), batch, heads, group, dim,
                                 value_dim, stride, k_pool.shape[1], tables.data_ptr(), tables.shape[1], block_size,
                                 counts.data_ptr(), lo.data_ptr(), sinks.data_ptr(), out.data_ptr())
    if status == 1:
        raise MemoryError("the paged decode kernel could not allocate its partials")
    if status == 3:
        return None
    if status != 0:
        raise ValueError("paged_decode: nothing to attend to")
    return out
