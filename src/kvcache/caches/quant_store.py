"""Where quantized tokens live: codes and float16 scales of every layer, grown by doubling.

Keys are kept as tiles of 16 tokens, channel-major (the kernel's layout, quant_ops.TILE); their per-token
scales too, while KIVI per-channel scales are one row of head_dim per block of ``group`` tokens. Values and
their scales are token-major rows. The cache (quantized.py) decides *when* tokens are stored; this class
only keeps them.
"""

from __future__ import annotations

import torch

from .quant_ops import TILE, QuantFormat, QuantizedRows, from_tiles, to_tiles

NAMES = ("kc", "ks", "ko", "vc", "vs", "vo")  # key codes, scales, offsets; value codes, scales, offsets


class QuantizedStore:
    def __init__(self, num_layers: int, batch: int, num_kv_heads: int, head_dim: int, key_fmt: QuantFormat,
                 value_fmt: QuantFormat, capacity: int):
        self.key_fmt, self.value_fmt = key_fmt, value_fmt
        self.tensors = self._allocate((num_layers, batch, num_kv_heads), head_dim, self._round_up(capacity))

    def _round_up(self, n: int) -> int:
        unit = self.key_fmt.group if self.key_fmt.per_channel else TILE
        return -(-max(n, 1) // unit) * unit

    def _allocate(self, lead: tuple[int, ...], dim: int, cap: int) -> dict[str, torch.Tensor]:
        width, groups = self.key_fmt.code_width(dim), dim // self.value_fmt.group
        key_scales = (cap // self.key_fmt.group, dim) if self.key_fmt.per_channel else (cap // TILE, groups, TILE)
        half = torch.float16
        return {"kc": torch.zeros(*lead, cap // TILE, width, TILE, dtype=torch.uint8),
                "ks": torch.zeros(*lead, *key_scales, dtype=half), "ko": torch.zeros(*lead, *key_scales, dtype=half),
                "vc": torch.zeros(*lead, cap, width, dtype=torch.uint8),
                "vs": torch.zeros(*lead, cap, groups, dtype=half), "vo": torch.zeros(*lead, cap, groups, dtype=half)}

    @property
    def capacity(self) -> int:
        """Tokens per layer and row it holds before it grows."""
        return self.tensors["vc"].shape[3]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    @property
    def bytes_per_token(self) -> int:
        """Codes and scales of one token, all layers and rows."""
        return self.nbytes // self.capacity

    def layer(self, layer: int) -> tuple[torch.Tensor, ...]:
        """One layer's six tensors (contiguous blocks), in ``NAMES`` order."""
        return tuple(self.tensors[name][layer] for name in NAMES)

    def rows(self, layer: int, count: int) -> QuantizedRows:
        return QuantizedRows(*self.layer(layer), count=count)

    def key_block_scales(self, layer: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A KIVI key block's stored (scale, offset), (batch, heads, head_dim)."""
        return self.tensors["ks"][layer, :, :, block], self.tensors["ko"][layer, :, :, block]

    def write(self, layer: int, start: int, end: int, codes: dict[str, torch.Tensor]) -> None:
        """Store tokens [start, end) of ``layer`` (codes token-major, as quant_ops.quantize returns them)."""
        if end > self.capacity:
            self._grow(end)
        t, g = self.tensors, self.key_fmt.group
        for name in ("vc", "vs", "vo"):
            t[name][layer, :, :, start:end] = codes[name]
        self._write_tiles("kc", layer, start, end, codes["kc"])
        if self.key_fmt.per_channel:
            t["ks"][layer, :, :, start // g:-(-end // g)] = codes["ks"]
            t["ko"][layer, :, :, start // g:-(-end // g)] = codes["ko"]
        else:
            self._write_tiles("ks", layer, start, end, codes["ks"])
            self._write_tiles("ko", layer, start, end, codes["ko"])

    def _write_tiles(self, name: str, layer: int, start: int, end: int, rows: torch.Tensor) -> None:
        """Token rows [start, end) into a tiled tensor (read-modify-write of the tiles they touch)."""
        first, last = start // TILE, -(-end // TILE)
        block = from_tiles(self.tensors[name][layer, :, :, first:last]).clone()
        block[:, :, start - first * TILE:end - first * TILE] = rows
        self.tensors[name][layer, :, :, first:last] = to_tiles(block)

    def _grow(self, needed: int) -> None:
        old = self.tensors
        lead, dim = tuple(old["vc"].shape[:3]), old["kc"].shape[4] * 8 // self.key_fmt.bits
        new = self._allocate(lead, dim, self._round_up(max(needed, 2 * self.capacity)))
        for name, t in old.items():
            new[name][:, :, :, : t.shape[3]] = t
        self.tensors = new

    def select(self, idx: torch.Tensor) -> None:
        """Keep/reorder/duplicate batch rows (all six tensors picked before any is replaced)."""
        self.tensors = {name: t.index_select(1, idx) for name, t in self.tensors.items()}
