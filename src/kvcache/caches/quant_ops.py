"""Group-wise quantization of keys and values, and attention over the quantized form (PyTorch reference).

Every stored value is ``scale * code + offset`` with an unsigned ``code`` of
``bits`` bits (int4: two codes per byte, the even index in the low nibble) and
a float16 ``scale`` / ``offset`` per group:

* ``per_token`` groups: ``group`` consecutive channels of one token (values;
  keys in the naive scheme).
* ``per_channel`` groups (KIVI's keys): one channel over ``group`` consecutive
  tokens, so an outlier channel gets its own scale instead of stretching every
  token's.

Asymmetric groups use ``offset = min``; symmetric ones ``offset = -2^(bits-1)
scale`` (the codes are signed integers shifted to unsigned).  Codes are
computed against the float16-rounded scale and offset, so what is stored is
exactly what is read back.

The attention helpers never dequantize a whole cache: ``quantized_partial``
walks the stored tokens in chunks and returns one softmax partial
(``model.attention.merge_partials`` merges it with the full-precision rest).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..model.attention import Partial, combine_partials, softmax_partial

CHUNK = 512  # tokens dequantized at a time by the reference attention
TILE = 16  # stored keys (codes and per-token scales) are tiles of 16 tokens, channel-major (see qattn.c)


@dataclass(frozen=True)
class QuantFormat:
    bits: int  # 8 or 4
    group: int  # channels per group (per_token) or tokens per group (per_channel)
    symmetric: bool = False
    per_channel: bool = False

    @property
    def levels(self) -> int:
        return (1 << self.bits) - 1

    def code_width(self, head_dim: int) -> int:
        return head_dim * self.bits // 8


def quantize(x: torch.Tensor, fmt: QuantFormat) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (..., T, D) -> codes uint8 (..., T, D*bits/8), scale and offset float16.

    Scales are (..., T, D/group) per token, (..., T/group, D) per channel (T a multiple of group).
    """
    *lead, t, d = x.shape
    xf = x.float()
    if fmt.per_channel:
        grouped = xf.reshape(*lead, t // fmt.group, fmt.group, d)
        reduce_dim = -2
    else:
        grouped = xf.reshape(*lead, t, d // fmt.group, fmt.group)
        reduce_dim = -1
    if fmt.symmetric:
        half = 1 << (fmt.bits - 1)
        absmax = grouped.abs().amax(reduce_dim, keepdim=True)
        scale = absmax / (half - 1)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale)).half()
        offset = (-half * scale.float()).half()
    else:
        lo, hi = grouped.amin(reduce_dim, keepdim=True), grouped.amax(reduce_dim, keepdim=True)
        scale = (hi - lo) / fmt.levels
        scale = torch.where(scale > 0, scale, torch.ones_like(scale)).half()
        offset = lo.half()
    if not (torch.isfinite(scale).all() and torch.isfinite(offset).all()):
        raise ValueError("keys/values beyond float16 range (|x| > 65504) cannot be quantized with float16 scales")
    codes = torch.round((grouped - offset.float()) / scale.float()).clamp_(0, fmt.levels).to(torch.uint8)
    codes = codes.reshape(*lead, t, d)
    if fmt.bits == 4:
        codes = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return codes, scale.squeeze(reduce_dim), offset.squeeze(reduce_dim)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, fmt: QuantFormat,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The stored values (..., T, D) back in ``dtype`` (for a chunk, never a whole cache)."""
    if fmt.bits == 4:
        codes = torch.stack((codes & 15, codes >> 4), dim=-1).flatten(-2)
    *lead, t, d = codes.shape
    c = codes.float()
    if fmt.per_channel:
        grouped = c.reshape(*lead, t // fmt.group, fmt.group, d)
        out = grouped * scale.float().unsqueeze(-2) + offset.float().unsqueeze(-2)
    else:
        grouped = c.reshape(*lead, t, d // fmt.group, fmt.group)
        out = grouped * scale.float().unsqueeze(-1) + offset.float().unsqueeze(-1)
    return out.reshape(*lead, t, d).to(dtype)


def hadamard(dim: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The orthonormal Sylvester-Hadamard matrix of order ``dim`` (a power of two)."""
    if dim < 1 or dim & (dim - 1):
        raise ValueError(f"rotate=1 needs a power-of-two head_dim, got {dim}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < dim:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return (h / math.sqrt(dim)).to(dtype)


def to_tiles(rows: torch.Tensor) -> torch.Tensor:
    """(..., T, W) token-major -> (..., T/16, W, 16) tiles, channel-major inside (T a multiple of 16)."""
    *lead, t, w = rows.shape
    return rows.reshape(*lead, t // TILE, TILE, w).transpose(-1, -2).contiguous()


def from_tiles(tiles: torch.Tensor) -> torch.Tensor:
    """(..., N, W, 16) tiles -> (..., 16 N, W) token-major rows."""
    *lead, n, w, _ = tiles.shape
    return tiles.transpose(-1, -2).reshape(*lead, n * TILE, w)


@dataclass
class QuantizedRows:
    """One layer's stored tokens: keys as tiles (B, H, T/16, W, 16) (per-channel scales: (B, H, T/group, D)),
    values as rows (B, H, T, W)."""

    k_codes: torch.Tensor
    k_scale: torch.Tensor
    k_offset: torch.Tensor
    v_codes: torch.Tensor
    v_scale: torch.Tensor
    v_offset: torch.Tensor
    count: int  # tokens stored


def _chunk(rows: QuantizedRows, key_fmt: QuantFormat, value_fmt: QuantFormat, start: int, end: int,
           dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Stored tokens [start, end) dequantized (start a multiple of the tile and of a KIVI key group)."""
    tiles = slice(start // TILE, -(-end // TILE))
    if key_fmt.per_channel:  # whole token blocks (a cropped cache may end inside one)
        whole = -(-end // key_fmt.group) * key_fmt.group
        kg = slice(start // key_fmt.group, whole // key_fmt.group)
        codes = from_tiles(rows.k_codes[:, :, start // TILE: whole // TILE])
        keys = dequantize(codes, rows.k_scale[:, :, kg], rows.k_offset[:, :, kg], key_fmt, dtype)[:, :, : end - start]
    else:
        codes = from_tiles(rows.k_codes[:, :, tiles])[:, :, : end - start]
        keys = dequantize(codes, from_tiles(rows.k_scale[:, :, tiles])[:, :, : end - start],
                          from_tiles(rows.k_offset[:, :, tiles])[:, :, : end - start], key_fmt, dtype)
    values = dequantize(rows.v_codes[:, :, start:end], rows.v_scale[:, :, start:end],
                        rows.v_offset[:, :, start:end], value_fmt, dtype)
    return keys, values


def _step(key_fmt: QuantFormat) -> int:
    return CHUNK if not key_fmt.per_channel else max(key_fmt.group, CHUNK // key_fmt.group * key_fmt.group)


def quantized_partial(qg: torch.Tensor, rows: QuantizedRows, key_fmt: QuantFormat, value_fmt: QuantFormat
                      ) -> Partial:
    """Partial softmax of scaled, grouped queries qg (B, H, n, D) over every stored token, chunk by chunk."""
    parts, step = [], _step(key_fmt)
    for start in range(0, rows.count, step):
        keys, values = _chunk(rows, key_fmt, value_fmt, start, min(start + step, rows.count), qg.dtype)
        parts.append(softmax_partial(torch.matmul(qg, keys.transpose(-1, -2)), values))
    return combine_partials(parts)


def dequantize_rows(rows: QuantizedRows, key_fmt: QuantFormat, value_fmt: QuantFormat,
                    dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """All stored tokens as full keys and values (B, H, count, D): only for callers that need tensors."""
    return _chunk(rows, key_fmt, value_fmt, 0, rows.count, dtype)
