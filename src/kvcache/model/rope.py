"""Rotary position embeddings (Llama's RoPE): the cos/sin tables and the rotation.

Kept apart from the model file so caches that store keys before rotation can use them.
"""

from __future__ import annotations

import math

import torch

from .config import FrequencyScaling, ModelConfig, YarnScaling


def rope_frequencies(config: ModelConfig) -> tuple[torch.Tensor, float]:
    """(inverse frequencies (head_dim / 2,), the scale applied to cos/sin), computed in fp32 like the reference
    implementation; the frequencies are returned as float64 for callers computing angles at large positions."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scale = 1.0
    if config.yarn is not None:
        inv_freq, scale = yarn_inv_freq(config.yarn, dim, config.rope_theta), config.yarn.attention_factor
    elif config.rope_scaling is not None:
        inv_freq = scaled_inv_freq(config.rope_scaling, inv_freq)
    return inv_freq.double(), scale


def scaled_inv_freq(scaling: FrequencyScaling, inv_freq: torch.Tensor) -> torch.Tensor:
    """``linear``: every frequency divided by the factor.  ``llama3`` (transformers' ``_compute_llama3_parameters``):
    wavelengths beyond ``original / low_freq_factor`` divided, below ``original / high_freq_factor`` kept, and
    a smooth interpolation between."""
    if scaling.kind == "linear":
        return inv_freq / scaling.factor
    original, low, high = scaling.original_max_positions, scaling.low_freq_factor, scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    divided = torch.where(wavelen > original / low, inv_freq / scaling.factor, inv_freq)
    smooth = (original / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * divided / scaling.factor + smooth * divided
    medium = ~(wavelen < original / high) * ~(wavelen > original / low)
    return torch.where(medium, smoothed, divided)


def rope_tables(config: ModelConfig, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (max_positions, head_dim), computed in fp32 like the reference implementation."""
    inv_freq, scale = rope_frequencies(config)
    freqs = torch.outer(torch.arange(config.max_positions, dtype=torch.int64).float(), inv_freq.float())
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)


def yarn_inv_freq(yarn: YarnScaling, dim: int, base: float) -> torch.Tensor:
    """YaRN's frequencies: interpolated (divided by ``factor``) for dimensions that rotate fewer than
    ``beta_slow`` times over the original context, kept for those rotating more than ``beta_fast`` times,
    a linear ramp between (transformers' ``_compute_yarn_parameters``)."""
    def correction_dim(rotations: float) -> float:
        return dim * math.log(yarn.original_max_positions / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(yarn.beta_fast), correction_dim(yarn.beta_slow)
    if yarn.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # no zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    extrapolate = 1 - ramp
    return (1.0 / (yarn.factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (i, i + d/2) of x (batch, heads, seq, d) by their position's angle."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class Rope(tuple):
    """A forward pass's ``(cos, sin)``, broadcasting over (batch, heads, seq, d) for :func:`apply_rope`, and
    :meth:`rotate_heads_last` for (batch, seq, heads, d): queries and keys rotated together, straight out of
    the fused QKV projection, with rotate-half's sign folded into the sin table once per pass (three ops
    per layer instead of fourteen)."""

    def __new__(cls, cos: torch.Tensor, sin: torch.Tensor) -> "Rope":
        rope = super().__new__(cls, (cos, sin))
        half = cos.shape[-1] // 2
        c, s = (cos, sin) if cos.dim() == 2 else (cos[:, 0], sin[:, 0])  # (seq, d) or (batch, seq, d)
        rope.cos_heads_last = c.unsqueeze(-2)
        rope.sin_heads_last = torch.cat((-s[..., :half], s[..., half:]), dim=-1).unsqueeze(-2)
        return rope

    def rotate_heads_last(self, x: torch.Tensor) -> torch.Tensor:
        """x (batch, seq, heads, d) rotated like apply_rope: x cos + (-x2, x1) sin = x cos + roll(x) sin'."""
        return torch.addcmul(x * self.cos_heads_last, x.roll(x.shape[-1] // 2, -1), self.sin_heads_last)
