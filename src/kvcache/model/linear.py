"""The linear layer of decoding: our decode matmul (matvec.py) for the few rows of a decoding step, oneDNN's
kernel called directly for the rest, with an optional blocked weight copy.

Shared by the model (every projection) and the caches (cascade attention's per-head products), so
caches never import the model file.
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import matvec


def _has_onednn_linear() -> bool:
    try:
        x, w = torch.ones(2, 1, 4), torch.ones(3, 4)
        return bool(torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "").shape == (2, 1, 3))
    except (AttributeError, RuntimeError):
        return False


ONEDNN_LINEAR = _has_onednn_linear()
DECODE_KERNEL = os.environ.get("KVCACHE_DECODE_KERNEL", "1") != "0"  # 0: oneDNN for every product (A/B runs)
_onednn_linear = torch.ops.mkldnn._linear_pointwise.default if ONEDNN_LINEAR else None  # resolved once


class WatchedParameter(nn.Parameter):
    """A Parameter that remembers when its memory was handed out beyond autograd's view.

    In-place changes made through ``.data`` or ``.numpy()`` (common in quantization and weight-surgery code)
    bump no version counter, so a copy derived from the weight could go stale unnoticed.  Any such access
    marks the parameter ``aliased``, and :class:`Linear` then never serves it from a derived copy again.
    """

    aliased = False

    @property
    def data(self) -> torch.Tensor:
        self.aliased = True
        return torch.Tensor.data.__get__(self)

    @data.setter
    def data(self, value: torch.Tensor) -> None:
        if value is self:  # module.to() to the dtype it already has: nothing changes, nothing is handed out
            return
        self.aliased = True  # the caller keeps `value`, which now is this weight's memory
        torch.Tensor.data.__set__(self, value)

    def numpy(self, *args, **kwargs):
        self.aliased = True
        return super().numpy(*args, **kwargs)


def watched(parameter: nn.Parameter, fresh: bool = False) -> WatchedParameter:
    """``parameter``'s tensor as a WatchedParameter (same memory, same requires_grad); ``fresh``: a new one
    even if it is watched already (for the owner of a just-built model: nobody else holds an alias yet)."""
    if isinstance(parameter, WatchedParameter) and not fresh:
        return parameter
    return WatchedParameter(parameter.detach(), requires_grad=parameter.requires_grad)


class Linear(nn.Linear):
    """nn.Linear that, at inference on CPU, calls oneDNN's linear directly.

    Measured here (docs/design.md): for the 1-16 row matmuls of decoding,
    oneDNN streams fp32 weights about twice as fast as the default MKL path.
    ``pack()`` adds a copy of the weight in oneDNN's blocked layout, used for
    every call once present: on this project's AMD Zen 5 machine it made
    1-row decode 18-24% faster and 16-row batches ~30% faster (an earlier
    Intel-class machine measured one-row calls ~10% slower packed).  The cost
    is a second copy of the weights.  Training (autograd) keeps the standard path.

    The copy is never stale: it is re-made when the weight is replaced or changed through a tracked op
    (version counter), and a weight whose memory was handed out through ``.data`` or ``.numpy()``
    (:class:`WatchedParameter`), or that is not a WatchedParameter at all, is always read directly.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.weight = watched(self.weight)

    packed: torch.Tensor | None = None
    _packed_from: tuple[torch.Tensor, int, int] | None = None  # (weight, version, data_ptr) it was made from

    def pack(self) -> None:
        """Make sure a current blocked copy of the weight exists (re-made only when the weight changed)."""
        if not self._packable():
            self.packed = self._packed_from = None
        elif self._stale():
            self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), 16)
            self._packed_from = (self.weight, self.weight._version, self.weight.data_ptr())

    def _packable(self) -> bool:
        w = self.weight
        return (ONEDNN_LINEAR and w.dtype == torch.float32 and not w.is_inference()
                and isinstance(w, WatchedParameter) and not w.aliased)

    def _stale(self) -> bool:
        """True unless the blocked copy was made from this very weight, unchanged since."""
        if self._packed_from is None:
            return True
        source, version, pointer = self._packed_from
        return source is not self.weight or (version, pointer) != (self.weight._version, self.weight.data_ptr())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if DECODE_KERNEL and not torch.is_grad_enabled() and matvec.serves(x, weight, self.packed is not None):
            return matvec.linear(x, weight, self.bias)  # the few rows of decoding, nearer the weights' read speed
        if ONEDNN_LINEAR and x.dtype == torch.float32 and x.device.type == "cpu" and not torch.is_grad_enabled():
            if self.packed is not None:
                # replaced or changed in place, or (not stale: it is the WatchedParameter packed) handed out
                if self._stale() or weight.aliased:
                    self.pack()
                weight = self.packed if self.packed is not None else weight
            return _onednn_linear(x, weight, self.bias, "none", [], "")
        return F.linear(x, weight, self.bias)

    __call__ = forward  # no module hooks on the decode path: nn.Module's call machinery is a share of every token
