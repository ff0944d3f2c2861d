"""The MLP activations kvcache runs, by the names config.json uses (transformers' ``ACT2FN`` entries)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F

# config.json's name -> the function; gelu_new, gelu_pytorch_tanh and gelu_fast are one formula (tanh approximation)
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu, "swish": F.silu, "gelu": F.gelu, "relu": F.relu,
    "gelu_new": partial(F.gelu, approximate="tanh"), "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh"),
    "gelu_fast": partial(F.gelu, approximate="tanh"),
}


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The function for a name ``hf_config.read_activation`` accepted."""
    return ACTIVATIONS[name]
