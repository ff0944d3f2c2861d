"""Which matrices of a model load in a GGUF weight format (qweight.py) rather than as float tensors.

``dtype`` names either a dtype to compute in (float32, bfloat16, ...) or a weight format (Q8_0, Q4_0, Q4_1, F16:
float32 activations, weights kept in that format).  ``"auto"`` keeps a GGUF's own formats where the kernels run
them (each matrix as stored), and a float16 Hugging Face folder as F16.  Matrices are the linear layers and the
token embedding (a tied head shares the embedding's blocks); norms, biases, positions, the MoE router and
DeepSeek's latent projections stay float.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from .gguf import GGMLTensor
from .linear import Linear
from .mla import LatentAttention
from .qweight import FORMATS, QuantWeight, format_name, supports

KEEP = "keep"  # the policy of dtype="auto": every matrix in the format it is stored in, where the kernels run it


@dataclass
class WeightPlan:
    """What a model's matrices are held as: ``policy`` is None (float), KEEP, or one format for every matrix."""

    policy: str | None = None

    def gguf_keep(self) -> frozenset[str]:
        """The GGML types a GGUF reader should hand over still encoded."""
        if self.policy == KEEP:
            return frozenset(FORMATS)
        return frozenset({self.policy}) if self.policy else frozenset()


def matrix_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The modules whose weight may be held in a GGUF format, by state-dict name of that weight."""
    latent = {name for name, m in model.named_modules() if isinstance(m, LatentAttention)}
    found = {"embed.weight": model.embed}
    for name, module in model.named_modules():
        if isinstance(module, Linear) and not any(name.startswith(p + ".") for p in latent):
            found[name + ".weight"] = module
    return found


def quantized_weights(model: nn.Module, state: dict, plan: WeightPlan) -> tuple[dict[str, QuantWeight], int]:
    """The matrices of ``state`` to hold as QuantWeights (by module name; taken out of ``state``) and how many
    matrices the plan wanted quantized but stay float (a row length the format cannot hold)."""
    if plan.policy is None:
        return {}, 0
    tied = model.config.tie_word_embeddings
    held, kept_float = {}, 0
    for name in matrix_modules(model):
        if name not in state or (tied and name == "lm_head.weight"):
            continue
        value = state[name]
        fmt = plan.policy if plan.policy != KEEP else (value.kind if isinstance(value, GGMLTensor) else None)
        if fmt not in FORMATS:
            continue
        shape = tuple(value.shape)
        if not supports(fmt, shape):
            kept_float += 1
            continue
        if isinstance(value, GGMLTensor) and value.kind == fmt:
            weight = QuantWeight.from_ggml(value.raw, fmt, shape)
        else:
            weight = QuantWeight.quantize(value.dequantize() if isinstance(value, GGMLTensor) else value, fmt)
        held[name.removesuffix(".weight")] = weight
        del state[name]
    return held, kept_float


def quantize_model(model: nn.Module, fmt: str, float_activations: bool = False) -> int:
    """Hold the matrices of a loaded float model in ``fmt`` (in place); returns how many stay float."""
    state = {name: module.weight.detach() for name, module in matrix_modules(model).items()}
    held, kept_float = quantized_weights(model, state, WeightPlan(fmt))
    model.hold_quantized(held, float_activations)
    return kept_float


def plan_for(dtype: str | torch.dtype) -> WeightPlan | None:
    """The plan a weight-format ``dtype`` names (``"Q8_0"``, ``"q4_1"``...), or None for a compute dtype."""
    if isinstance(dtype, str) and format_name(dtype):
        return WeightPlan(format_name(dtype))
    return None


def describe(model: nn.Module, kept_float: int) -> str:
    """The weight part of the load message: bytes per format, and matrices that could not be held."""
    sizes = model.weight_formats()
    text = ", ".join(f"{fmt} {size / 1e6:,.0f} MB" for fmt, size in sorted(sizes.items(), key=lambda kv: -kv[1]))
    if kept_float:
        text += f"; {kept_float} matrices kept float (row length not a multiple of 64)"
    return text
