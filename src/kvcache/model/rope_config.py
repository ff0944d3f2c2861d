"""A config.json's rotary embedding settings: the base, and the scalings transformers runs for every family.

transformers keeps them in ``rope_parameters`` (older files: ``rope_scaling`` plus ``rope_theta``). The types
read here are the ones whose frequencies stay fixed while a sequence grows, so cached keys stay valid:
``default``, ``linear`` (positions divided by ``factor``), ``llama3`` (low frequencies divided, a smooth
ramp between) and ``yarn``. ``dynamic`` (NTK) only changes the frequencies past ``max_position_embeddings``,
which kvcache never runs, so within the context it is ``default``. Others (``longrope``, ...) are refused
by name. ``rope.py`` turns these into frequencies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .hf_config import ConfigValueError, is_int

FIXED_FREQUENCY_TYPES = ("default", "dynamic", "linear", "llama3", "yarn")


@dataclass(frozen=True)
class FrequencyScaling:
    """``linear``: every frequency divided by ``factor``; ``llama3``: wavelengths longer than
    ``original / low_freq_factor`` divided, shorter than ``original / high_freq_factor`` kept, a ramp between."""

    kind: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_positions: int = 8192


@dataclass(frozen=True)
class YarnScaling:
    """YaRN rope scaling (rope_type "yarn"), as transformers computes it."""

    factor: float
    original_max_positions: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float = 1.0  # multiplies cos/sin
    truncate: bool = True
    mscale: float | None = None  # DeepSeek: with mscale_all_dim, sets attention_factor and the softmax scale
    mscale_all_dim: float | None = None


@dataclass(frozen=True)
class RopeSettings:
    theta: float
    scaling: FrequencyScaling | None = None
    yarn: YarnScaling | None = None
    softmax_mscale: float = 1.0  # DeepSeek's YaRN: multiplies the softmax scale twice


def read_rope(cfg: dict[str, Any]) -> RopeSettings:
    """The rope settings of a config dict; ConfigValueError names the key of a value we cannot run."""
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise ConfigValueError("rope_parameters", rope, "must be an object", "rope_parameters")
    theta = rope.get("rope_theta")
    theta = cfg.get("rope_theta") if theta is None else theta
    theta = 10000.0 if theta is None else theta
    kind = rope.get("rope_type") or rope.get("type") or "default"
    if kind not in FIXED_FREQUENCY_TYPES:
        raise ConfigValueError("rope_type", kind, f"is not supported (supported: {', '.join(FIXED_FREQUENCY_TYPES)})",
                               "rope_parameters.rope_type")
    if kind in ("default", "dynamic"):
        return RopeSettings(theta)
    original = rope.get("original_max_position_embeddings")
    if original is None:  # transformers' standardize_rope_params: the model's own context
        original = cfg.get("original_max_position_embeddings") or cfg.get("max_position_embeddings")
    if not is_int(original) or original < 1:
        raise ConfigValueError("original_max_position_embeddings", original, f"must be an integer >= 1 for {kind}",
                               "rope_parameters.original_max_position_embeddings")
    if kind == "yarn":
        return _yarn(cfg, rope, theta, original)
    factor = _number(rope, "factor", minimum=1.0 if kind == "llama3" else 0.0)
    if kind == "linear":
        return RopeSettings(theta, FrequencyScaling("linear", factor, original_max_positions=original))
    low, high = _number(rope, "low_freq_factor"), _number(rope, "high_freq_factor")
    if high <= low:
        raise ConfigValueError("high_freq_factor", high, f"must be > low_freq_factor = {low}",
                               "rope_parameters.high_freq_factor")
    return RopeSettings(theta, FrequencyScaling("llama3", factor, low, high, original))


def _number(rope: dict[str, Any], key: str, minimum: float = 0.0) -> float:
    value = rope.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= minimum:
        raise ConfigValueError(key, value, f"must be a number > {minimum:g}", f"rope_parameters.{key}")
    return float(value)


def _yarn(cfg: dict[str, Any], rope: dict[str, Any], theta: float, original: int) -> RopeSettings:
    factor = rope.get("factor")
    factor = cfg.get("max_position_embeddings", 2048) / original if factor is None else _number(rope, "factor")

    def get_mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    mscale, mscale_all = rope.get("mscale"), rope.get("mscale_all_dim")
    attention_factor = rope.get("attention_factor")
    if attention_factor is None:
        attention_factor = (get_mscale(factor, mscale) / get_mscale(factor, mscale_all) if mscale and mscale_all
                            else get_mscale(factor))
    yarn = YarnScaling(float(factor), original, float(rope.get("beta_fast") or 32), float(rope.get("beta_slow") or 1),
                       float(attention_factor), bool(rope.get("truncate", True)), mscale, mscale_all)
    softmax = get_mscale(factor, mscale_all) if mscale_all else 1.0
    return RopeSettings(theta, yarn=yarn, softmax_mscale=softmax)


def to_hf(theta: float, scaling: FrequencyScaling | None, yarn: YarnScaling | None) -> dict[str, Any]:
    """The ``rope_parameters`` object transformers reads back."""
    if yarn is not None:
        return {"rope_type": "yarn", "rope_theta": theta, "factor": yarn.factor,
                "original_max_position_embeddings": yarn.original_max_positions, "beta_fast": yarn.beta_fast,
                "beta_slow": yarn.beta_slow, "truncate": yarn.truncate, "attention_factor": yarn.attention_factor,
                "mscale": yarn.mscale, "mscale_all_dim": yarn.mscale_all_dim}
    if scaling is None:
        return {"rope_type": "default", "rope_theta": theta}
    out = {"rope_type": scaling.kind, "rope_theta": theta, "factor": scaling.factor}
    if scaling.kind == "llama3":
        out.update(low_freq_factor=scaling.low_freq_factor, high_freq_factor=scaling.high_freq_factor,
                   original_max_position_embeddings=scaling.original_max_positions)
    return out
