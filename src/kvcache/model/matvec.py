"""The decode matmul: ``x @ w.T + b`` for the few rows of a decoding step, from our own kernel (matvec.c).

Decoding streams every weight once per token; oneDNN's small-M path streams them well below the machine's
read bandwidth (docs/benchmarks.md), so ``Linear`` sends those products here.  Weights stay as they are
(float32, bfloat16 or float16, PyTorch's row-major layout, no copy); a half weight is widened exactly and every
product and sum is float32, the result rounded once to the model's dtype.  Past the measured crossover
(``CROSSOVER``) larger batches and prefill keep oneDNN.  Without a compiler the callers keep oneDNN for everything.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from .. import native

SOURCE = Path(__file__).with_name("matvec.c")
MAX_ROWS = 16  # the kernel's own limit
WEIGHT_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
# Rows up to which the kernel is the faster one, measured on this project's machine (docs/benchmarks.md,
# "The decode matmul"): one row for float32 weights that oneDNN has a blocked copy of, up to four otherwise
# and for bfloat16.  Past that oneDNN's blocked matmul wins.
CROSSOVER = {(torch.float32, True): 1, (torch.float32, False): 4, (torch.bfloat16, False): 4}


def library() -> ctypes.CDLL | None:
    lib = native.load(SOURCE, "decode matmul kernel")
    if lib is not None and lib.kv_linear.argtypes is None:
        ptr, num = ctypes.c_void_p, ctypes.c_int
        lib.kv_linear.argtypes = [ptr, ptr, num, ptr, ptr, num, num, num]
        lib.kv_linear.restype = ctypes.c_int
    return lib


def serves(x: torch.Tensor, weight: torch.Tensor, packed: bool = False) -> bool:
    """True when the kernel is the one to compute this product: no more rows than its crossover with oneDNN
    (``packed``: oneDNN has a blocked copy of the weight), a float32 or bfloat16 weight (contiguous, CPU) and
    activations of the weight's dtype."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    limit = CROSSOVER.get((weight.dtype, packed and weight.dtype == torch.float32), 0)
    return (0 < rows <= limit and x.dtype == weight.dtype and weight.is_contiguous() and weight.device.type == "cpu"
            and library() is not None)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` in float32 arithmetic, returned in ``x``'s dtype (callers check ``serves``)."""
    n, k = weight.shape
    rows = x.reshape(-1, k).to(torch.float32).contiguous()
    out = torch.empty(rows.shape[0], n, dtype=torch.float32)
    b = None if bias is None else bias.to(torch.float32).contiguous()
    status = library().kv_linear(rows.data_ptr(), weight.data_ptr(), WEIGHT_DTYPES[weight.dtype],
                                 None if b is None else b.data_ptr(), out.data_ptr(), rows.shape[0], n, k)
    if status != 0:
        raise ValueError(f"kv_linear: {rows.shape[0]} rows x ({n}, {k}) is outside the kernel's range")
    return out.view(*x.shape[:-1], n).to(x.dtype)
