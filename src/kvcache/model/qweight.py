"""Weights kept in a GGUF format instead of float: Q8_0, Q4_0, Q4_1 (blocks of 32 with fp16 scales) and F16.

A GGUF's quantized tensors are taken as they are (``from_ggml``: the same blocks, repacked for the kernel, so a
file loads at its own size); float weights are quantized with llama.cpp's own rules (``gguf.quants``) when a
format is asked for explicitly.  ``qmatvec.c`` documents the packed layout.  ``dequantize`` gives the exact
float32 values the format stands for (the same numbers ``gguf.quants.dequantize`` gives), which is what the
float-activation mode and prefill multiply by.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import native

SOURCE = Path(__file__).with_name("qmatvec.c")
BLOCK = 32
FORMAT_CODES = {"Q8_0": 1, "Q4_0": 2, "Q4_1": 3}  # qmatvec.c's enum
FORMATS = ("F16", *FORMAT_CODES)  # every weight format a QuantWeight holds
BYTES_PER_BLOCK = {"F16": 64, "Q8_0": 34, "Q4_0": 18, "Q4_1": 20}  # as GGUF stores them; the repacked size is equal


def library() -> ctypes.CDLL | None:
    lib = native.load(SOURCE, "quantized matmul kernel")
    return declare(lib) if lib is not None and lib.kv_qlinear.argtypes is None else lib


def declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    """``lib`` (a build of qmatvec.c) with its functions' argument types set."""
    ptr, num, long = ctypes.c_void_p, ctypes.c_int, ctypes.c_long
    lib.kv_qlinear.argtypes = [ptr, ptr, ptr, ptr, num, ptr, ptr, num, num, num]
    lib.kv_qdequant.argtypes = [ptr, ptr, ptr, num, ptr, long, long, num, ptr]
    lib.kv_qlinear.restype = lib.kv_qdequant.restype = ctypes.c_int
    return lib


def format_name(text: str) -> str | None:
    """The weight format ``text`` names (case-insensitive: ``q8_0``, ``Q4_1``, ``f16``), or None."""
    name = text.strip().upper()
    return name if name in FORMATS else None


def supports(fmt: str, shape: tuple[int, int]) -> bool:
    """True when a (N, K) matrix can be held in ``fmt``: the quantized formats need K a multiple of 64."""
    return fmt == "F16" or shape[1] % 64 == 0


def _pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """(N, K) codes 0..15 -> (N, K / 2) bytes in qmatvec.c's group layout (128 elements per 64 bytes, element j
    in the low nibble of byte j and 64 + j in the high; a last group of 64 as 32 bytes, j and 32 + j)."""
    n, k = codes.shape
    full = k // 128 * 128
    groups = codes[:, :full].reshape(n, -1, 2, 64)
    parts = [(groups[:, :, 0] | groups[:, :, 1] << 4).reshape(n, -1)]
    if k > full:
        tail = codes[:, full:].reshape(n, 2, 32)
        parts.append(tail[:, 0] | tail[:, 1] << 4)
    return np.ascontiguousarray(np.concatenate(parts, axis=1))


def _tensor(array: np.ndarray | None) -> torch.Tensor | None:
    return None if array is None else torch.from_numpy(np.ascontiguousarray(array))


@dataclass(eq=False)
class QuantWeight:
    """An (N, K) matrix in a GGUF weight format: ``codes`` (uint8; float16 values for F16), ``scales`` and
    ``mins`` (float16 (N, K / 32); mins only for Q4_1)."""

    fmt: str
    shape: tuple[int, int]
    codes: torch.Tensor
    scales: torch.Tensor | None = None
    mins: torch.Tensor | None = None

    @classmethod
    def from_ggml(cls, raw: np.ndarray, fmt: str, shape: tuple[int, int]) -> QuantWeight:
        """A GGUF tensor's bytes (rows of blocks, as ``GGUFReader`` maps them) repacked, values unchanged."""
        n, k = shape
        if fmt == "F16":
            return cls(fmt, shape, torch.from_numpy(np.array(raw, dtype=np.uint8).view(np.float16).reshape(n, k)))
        if not supports(fmt, shape):
            raise ValueError(f"a {fmt} matrix needs its row length to be a multiple of 64, got {shape}")
        blocks = np.asarray(raw, dtype=np.uint8).reshape(n, k // BLOCK, BYTES_PER_BLOCK[fmt])
        scales = np.ascontiguousarray(blocks[..., 0:2]).view(np.float16).reshape(n, -1)
        mins = np.ascontiguousarray(blocks[..., 2:4]).view(np.float16).reshape(n, -1) if fmt == "Q4_1" else None
        if fmt == "Q8_0":
            codes = (blocks[..., 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8).reshape(n, k)
        else:
            qs = blocks[..., 4:] if fmt == "Q4_1" else blocks[..., 2:]  # byte j: element j low, j + 16 high
            codes = _pack_nibbles(np.concatenate([qs & 15, qs >> 4], axis=-1).reshape(n, k))
        return cls(fmt, shape, _tensor(codes), _tensor(scales), _tensor(mins))

    @classmethod
    def quantize(cls, weight: torch.Tensor, fmt: str) -> QuantWeight:
        """``weight`` (N, K) in ``fmt``, quantized by llama.cpp's reference rules (``gguf.quants.quantize``)."""
        from gguf import GGMLQuantizationType, quants

        shape = tuple(weight.shape)
        values = weight.detach().to(torch.float32).contiguous().numpy()
        raw = quants.quantize(values, GGMLQuantizationType[fmt])
        return cls.from_ggml(raw.view(np.uint8), fmt, shape)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in (self.codes, self.scales, self.mins) if t is not None)

    def _pointers(self) -> tuple[int, int, int | None]:
        return (self.codes.data_ptr(), self.scales.data_ptr(),
                None if self.mins is None else self.mins.data_ptr())

    def dequantize(self, rows: torch.Tensor | slice | None = None) -> torch.Tensor:
        """The float32 values of every row (or of ``rows``: a slice, or a tensor of row indices)."""
        n, k = self.shape
        if self.fmt == "F16":
            return (self.codes if rows is None else self.codes[rows]).to(torch.float32)
        lib = library()
        if lib is None:
            return self._dequantize_numpy(rows)
        if isinstance(rows, torch.Tensor):
            idx = rows.reshape(-1).to(torch.int64).contiguous()
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
                raise IndexError(f"row index out of range for a matrix of {n} rows")
            out = torch.empty(idx.numel(), k)
            status = lib.kv_qdequant(*self._pointers(), FORMAT_CODES[self.fmt], idx.data_ptr(), 0, idx.numel(), k,
                                     out.data_ptr())
            return out.view(*rows.shape, k) if status == 0 else self._failed(status)
        first, stop, _ = (rows or slice(None)).indices(n)
        out = torch.empty(max(0, stop - first), k)
        status = lib.kv_qdequant(*self._pointers(), FORMAT_CODES[self.fmt], None, first, out.shape[0], k,
                                 out.data_ptr())
        return out if status == 0 else self._failed(status)

    def _failed(self, status: int) -> torch.Tensor:
        raise ValueError(f"kv_qdequant refused a {self.fmt} matrix of shape {self.shape} (status {status})")

    def _dequantize_numpy(self, rows) -> torch.Tensor:
        """The same values without the kernel (no compiler): unpack the layout in numpy."""
        n, k = self.shape
        codes = self.codes.numpy()
        if self.fmt != "Q8_0":
            full, parts = k // 128 * 128, []
            groups = codes[:, : full // 2].reshape(n, -1, 64)
            parts.append(np.stack([groups & 15, groups >> 4], axis=2).reshape(n, -1))
            if k > full:
                tail = codes[:, full // 2:]
                parts.append(np.concatenate([tail & 15, tail >> 4], axis=1))
            codes = np.concatenate(parts, axis=1)
        d = np.repeat(self.scales.numpy().astype(np.float32), BLOCK, axis=1)
        if self.fmt == "Q4_1":
            values = d * codes.astype(np.float32) + np.repeat(self.mins.numpy().astype(np.float32), BLOCK, axis=1)
        else:
            values = d * (codes.astype(np.float32) - (128.0 if self.fmt == "Q8_0" else 8.0))
        out = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))
        return out if rows is None else out[rows]
