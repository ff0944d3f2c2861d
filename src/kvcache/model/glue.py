"""A decoder layer's small float32 steps in one compiled call each (glue.c): RMSNorm with the residual add before
it, RoPE on the fused QKV output in place, SiLU-mul of the fused gate/up output.

On a CPU a decoding step spends a large share outside its matmuls on ~10 PyTorch ops per layer over a few
hundred floats -- dispatch, not arithmetic (docs/benchmarks.md).  Each function here is a drop-in for its
PyTorch form, within float32 rounding of it; ``serves`` says when it applies (float32, CPU, no autograd, the
library built); elsewhere the callers keep PyTorch.  ``KVCACHE_GLUE_KERNEL=0`` turns it off (A/B runs).
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import torch

from .. import native

SOURCE = Path(__file__).with_name("glue.c")
ENABLED = os.environ.get("KVCACHE_GLUE_KERNEL", "1") != "0"


def library() -> ctypes.CDLL | None:
    lib = native.load(SOURCE, "decoder-layer glue kernel")
    return declare(lib) if lib is not None and lib.kv_rmsnorm.argtypes is None else lib


def declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    """``lib`` (a build of glue.c) with its functions' argument types set."""
    ptr, num, long = ctypes.c_void_p, ctypes.c_int, ctypes.c_long
    lib.kv_rmsnorm.argtypes = [ptr, ptr, ptr, ctypes.c_float, ptr, ptr, long, num]
    lib.kv_rope_rows.argtypes = [ptr, long, long, num, num, ptr, ptr, long]
    lib.kv_silu_mul.argtypes = [ptr, ptr, long, num]
    lib.kv_rmsnorm.restype = lib.kv_rope_rows.restype = lib.kv_silu_mul.restype = ctypes.c_int
    return lib


def serves(x: torch.Tensor) -> bool:
    """True when the compiled glue computes this step: float32 on the CPU, no autograd, the library built."""
    return (ENABLED and x.dtype == torch.float32 and x.device.type == "cpu" and not torch.is_grad_enabled()
            and library() is not None)


def _checked(status: int, what: str) -> None:
    if status != 0:
        raise ValueError(f"{what}: arguments outside the kernel's range")


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float, delta: torch.Tensor | None = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(h, rms_norm(h) * weight)`` with ``h = x + delta`` (``delta`` None: ``h`` is ``x``)."""
    dim = x.shape[-1]
    x = x.contiguous()
    rows = x.numel() // dim
    y = torch.empty_like(x)
    if delta is None:
        h, d = x, None
    else:
        h, d = torch.empty_like(x), delta.contiguous()
    w = weight.contiguous()
    _checked(library().kv_rmsnorm(x.data_ptr(), None if d is None else d.data_ptr(), w.data_ptr(), eps,
                                  None if d is None else h.data_ptr(), y.data_ptr(), rows, dim), "rmsnorm")
    return h, y


def rope_in_place(qkv: torch.Tensor, heads: int, dim: int, cos: torch.Tensor, sin_signed: torch.Tensor) -> None:
    """Rotate the first ``heads`` vectors of ``dim`` floats of every row of ``qkv`` (batch, seq, width;
    contiguous) in place: ``x cos + roll(x, dim / 2) sin_signed``, the tables (seq or batch * seq rows of dim)
    as :class:`~kvcache.model.rope.Rope` holds them."""
    rows = qkv.numel() // qkv.shape[-1]
    c, s = cos.contiguous(), sin_signed.contiguous()
    _checked(library().kv_rope_rows(qkv.data_ptr(), rows, qkv.shape[-1], heads, dim, c.data_ptr(), s.data_ptr(),
                                    c.numel() // dim), "rope")


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` of ``gate_up`` (..., 2 * width), gate first."""
    width = gate_up.shape[-1] // 2
    h = gate_up.contiguous()
    out = torch.empty(*h.shape[:-1], width, dtype=h.dtype)
    _checked(library().kv_silu_mul(h.data_ptr(), out.data_ptr(), h.numel() // (2 * width), width), "silu_mul")
    return out
