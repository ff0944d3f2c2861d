"""Reading a Hugging Face ``config.json``: the file, the checks on its values, and the attention geometry.

The geometry (layers, heads, KV heads, head size, hidden size, positions, MLA's latent widths) is what a
KV cache is sized by. It is read here once, with each family's key names, for both consumers: the model
(``config.py`` builds a ``ModelConfig`` from it) and the torch-free memory calculator (``memory.py``),
which also sizes configs of architectures the model does not run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from numbers import Integral
from pathlib import Path
from typing import Any

# our field -> the config.json keys that may hold it: the Llama family's name first, GPT-2's (n_*), then others'
GEOMETRY_KEYS = {
    "num_layers": ("num_hidden_layers", "n_layer", "num_layers"),
    "num_heads": ("num_attention_heads", "n_head", "num_heads"),
    "hidden_size": ("hidden_size", "n_embd", "d_model"),
    "num_kv_heads": ("num_key_value_heads", "n_head_kv", "num_kv_heads"),  # absent: every head has its own
    "max_positions": ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len"),
}
# the MLP activations kvcache runs, by config.json's names (transformers' ACT2FN); model/activations.py runs them
ACTIVATION_NAMES = ("silu", "swish", "gelu", "relu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast")
LATENT_KEYS = ("kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim")


class ConfigValueError(ValueError):
    """A config value of the wrong type or out of range, named by field (and config.json key) and value."""

    def __init__(self, field: str, value: Any, reason: str, key: str | None = None):
        self.field, self.value, self.reason, self.key = field, value, reason, key
        name = f"{key!r}" if key and key == field else f"{key!r} ({field})" if key else f"{field!r}"
        super().__init__(f"{name} = {value!r} {reason}")


def is_int(value: Any) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON file that must hold an object (config.json, tokenizer_config.json, ...); ValueError naming it."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: must hold a JSON object, got {type(data).__name__}")
    return data


def config_file(path: str | Path) -> Path:
    """The config.json a folder or file path names; FileNotFoundError if there is none."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json at {path}")
    return path


@dataclass(frozen=True)
class Geometry:
    """The attention shape of a config, each value checked (ConfigValueError names the key)."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int  # query/key width per head (MLA: nope + rope)
    hidden_size: int
    max_positions: int | None  # None: the config does not say
    latent: dict[str, int]  # MLA (DeepSeek): kv_lora_rank, qk_rope_head_dim, qk_nope_head_dim, v_head_dim; else {}


def attention_geometry(cfg: dict[str, Any]) -> Geometry:
    """The geometry from a config dict; KeyError names the missing key as the config's family spells it."""
    gpt2 = cfg.get("model_type") == "gpt2" or (cfg.get("model_type") is None and "n_layer" in cfg)
    layers, heads, hidden = (_required(cfg, field, gpt2) for field in ("num_layers", "num_heads", "hidden_size"))
    kv_heads = _optional(cfg, "num_kv_heads", gpt2) or heads
    positions = _optional(cfg, "max_positions", gpt2)
    latent = {key: positive_int(cfg, key) for key in LATENT_KEYS} if cfg.get("kv_lora_rank") is not None else {}
    if latent:  # every head reads the one latent: num_key_value_heads means nothing
        return Geometry(layers, heads, heads, latent["qk_nope_head_dim"] + latent["qk_rope_head_dim"], hidden,
                        positions, latent)
    head_dim = None if gpt2 else _optional(cfg, "head_dim", gpt2)
    if head_dim is None:
        hidden_key, heads_key = _key(cfg, "hidden_size", gpt2), _key(cfg, "num_heads", gpt2)
        if hidden % heads:
            raise ConfigValueError(hidden_key, hidden, f"must be a multiple of {heads_key} = {heads} "
                                                       "(no head_dim given)", hidden_key)
        head_dim = hidden // heads
    return Geometry(layers, heads, kv_heads, head_dim, hidden, positions, {})


def _keys(field: str, gpt2: bool) -> tuple[str, ...]:
    """The keys to look in, the family's own name first (it is the one a missing-key error names)."""
    keys = GEOMETRY_KEYS.get(field, (field,))
    return tuple(sorted(keys, key=lambda k: not k.startswith("n_"))) if gpt2 else keys


def _key(cfg: dict[str, Any], field: str, gpt2: bool) -> str:
    """The key that holds ``field`` in this config (the family's own name when none does)."""
    keys = _keys(field, gpt2)
    return next((k for k in keys if cfg.get(k) is not None), keys[0])


def _optional(cfg: dict[str, Any], field: str, gpt2: bool) -> int | None:
    key = _key(cfg, field, gpt2)
    return None if cfg.get(key) is None else positive_int(cfg, key, field)


def _required(cfg: dict[str, Any], field: str, gpt2: bool) -> int:
    value = _optional(cfg, field, gpt2)
    if value is None:
        raise KeyError(_key(cfg, field, gpt2))
    return value


def positive_int(cfg: dict[str, Any], key: str, field: str | None = None) -> int:
    """``cfg[key]``, an integer >= 1, or ConfigValueError naming the key (and our field)."""
    value = cfg.get(key)
    if not is_int(value) or value < 1:
        raise ConfigValueError(field or key, value, "must be an integer >= 1", key)
    return value


def read_activation(cfg: dict[str, Any], key: str, default: str) -> str:
    """The activation ``cfg[key]`` names (absent or null: ``default``); ConfigValueError for one we do not run."""
    name = cfg.get(key)
    name = default if name is None else name
    if name not in ACTIVATION_NAMES:
        raise ConfigValueError(key, name, f"is not supported (supported: {', '.join(ACTIVATION_NAMES)})", key)
    return name
