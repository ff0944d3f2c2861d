"""Linear layers and embeddings whose weights stay in a GGUF format (qweight.py), multiplied as they are.

Quantized matrices run qmatvec.c's integer kernel on activations quantized to 8 bits per block, as llama.cpp
does, for every row count: each row's result is the one it gets alone, so a batched engine step gives every
sequence the tokens single-stream decoding gives it.  ``float_activations`` keeps activations in float32
instead (the weights widened ``SLICE_FLOATS`` at a time, then PyTorch's matmul), which equals the
dequantized-weight model to float rounding; it is also the path for autograd and machines without a compiler.
F16 weights take the float decode matmul (matvec.c widens them in registers) for a few rows and the widened
slices otherwise.  No float copy of a whole matrix is ever held.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import linear, matvec, qweight
from .qweight import QuantWeight

SLICE_FLOATS = 1 << 20  # weights widened per slice of a prefill matmul: 4 MB of float32, about an L2's worth
F16_CROSSOVER = 4  # rows up to which the fp16 decode matmul beats widening then oneDNN (as for bf16; matvec.py)


class QuantLinear(nn.Module):
    """``x @ w.T + b`` with ``w`` held as a :class:`QuantWeight` (float32 activations in and out)."""

    def __init__(self, weight: QuantWeight, bias: bool = False, float_activations: bool = False):
        super().__init__()
        self.qweight = weight
        self.out_features, self.in_features = weight.shape
        self.bias = nn.Parameter(torch.zeros(weight.shape[0]), requires_grad=False) if bias else None
        self.float_activations = float_activations
        self._call = None

    @property
    def weight(self) -> torch.Tensor:
        """The weight's float32 values (computed on each access: for export and inspection, not the hot path)."""
        return self.qweight.dequantize()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.qweight.fmt}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.qweight
        rows = x.numel() // self.in_features if self.in_features else 0
        if x.dtype != torch.float32:
            x = x.to(torch.float32)
        if rows > 0 and not torch.is_grad_enabled():
            if q.fmt == "F16":
                if linear.DECODE_KERNEL and rows <= F16_CROSSOVER and matvec.library() is not None:
                    return matvec.linear(x, q.codes, self.bias)
            elif not self.float_activations and qweight.library() is not None:
                return self._integer_product(x, rows)
        return self._sliced_product(x, rows)

    __call__ = forward  # no module hooks on the decode path (see linear.Linear)

    def _integer_product(self, x: torch.Tensor, rows: int) -> torch.Tensor:
        if self._call is None:  # the kernel's arguments that never change, bound once (a share of every token)
            q = self.qweight
            self._call = (qweight.library().kv_qlinear, q.codes.data_ptr(), q.scales.data_ptr(),
                          None if q.mins is None else q.mins.data_ptr(), qweight.FORMAT_CODES[q.fmt])
        kernel, codes, scales, mins, fmt = self._call
        n, k = self.out_features, self.in_features
        flat = x if x.is_contiguous() else x.contiguous()
        out = torch.empty(*x.shape[:-1], n)
        bias = None if self.bias is None else self.bias.data_ptr()
        if kernel(flat.data_ptr(), codes, scales, mins, fmt, bias, out.data_ptr(), rows, n, k) != 0:
            raise ValueError(f"kv_qlinear refused {rows} rows x a {self.qweight.fmt} matrix of shape "
                             f"{self.qweight.shape}")
        return out

    def _sliced_product(self, x: torch.Tensor, rows: int) -> torch.Tensor:
        """Widen a slice of output rows at a time and multiply it with PyTorch: the float-activation mode, F16
        beyond a few rows, autograd (gradients reach ``x``; the weights have none)."""
        n, k = self.out_features, self.in_features
        flat = x.reshape(rows, k)
        step = max(16, SLICE_FLOATS // max(1, k))
        if step >= n:
            out = F.linear(flat, self.qweight.dequantize(), self.bias)
        else:
            out = torch.cat([F.linear(flat, self.qweight.dequantize(slice(n0, n0 + step)),
                                      None if self.bias is None else self.bias[n0:n0 + step])
                             for n0 in range(0, n, step)], dim=-1)
        return out.view(*x.shape[:-1], n)


class QuantEmbedding(nn.Module):
    """A token embedding held as a :class:`QuantWeight`: the rows looked up are widened to float32."""

    def __init__(self, weight: QuantWeight):
        super().__init__()
        self.qweight = weight
        self.num_embeddings, self.embedding_dim = weight.shape

    @property
    def weight(self) -> torch.Tensor:
        return self.qweight.dequantize()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.qweight.dequantize(ids)

    __call__ = forward
