"""The linear layer of decoding: oneDNN's kernel called directly, with an optional blocked weight copy.

Shared by the model (every projection) and the caches (cascade attention's per-head products), so
caches never import the model file.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def _has_onednn_linear() -> bool:
    try:
        x, w = torch.ones(2, 1, 4), torch.ones(3, 4)
        return bool(torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "").shape == (2, 1, 3))
    except (AttributeError, RuntimeError):
        return False


ONEDNN_LINEAR = _has_onednn_linear()


class Linear(nn.Linear):
    """nn.Linear that, at inference on CPU, calls oneDNN's linear directly.

    Measured here (docs/design.md): for the 1-16 row matmuls of decoding,
    oneDNN streams fp32 weights about twice as fast as the default MKL path.
    ``pack()`` adds a copy of the weight in oneDNN's blocked layout, used for
    every call once present: on this project's AMD Zen 5 machine it made
    1-row decode 18-24% faster and 16-row batches ~30% faster (an earlier
    Intel-class machine measured one-row calls ~10% slower packed).  The cost
    is a second copy of the weights.  Training (autograd) keeps the standard path.
    """

    packed: torch.Tensor | None = None
    _packed_from: tuple[torch.Tensor, int, int] | None = None  # (weight, version, data_ptr) it was made from

    def pack(self) -> None:
        """Make sure a current blocked copy of the weight exists (re-made only when the weight changed)."""
        if ONEDNN_LINEAR and self.weight.dtype == torch.float32 and not self.weight.is_inference() and self._stale():
            self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), 16)
            self._packed_from = (self.weight, self.weight._version, self.weight.data_ptr())

    def _stale(self) -> bool:
        """True unless the blocked copy was made from this very weight, unchanged since."""
        if self._packed_from is None:
            return True
        source, version, pointer = self._packed_from
        return source is not self.weight or (version, pointer) != (self.weight._version, self.weight.data_ptr())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if ONEDNN_LINEAR and not torch.is_grad_enabled() and x.device.type == "cpu" and x.dtype == torch.float32:
            weight = self.weight
            if self.packed is not None:
                if self._stale():  # the weight was replaced or changed in place since it was packed
                    self.pack()
                weight = self.packed
            return torch.ops.mkldnn._linear_pointwise(x, weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)
