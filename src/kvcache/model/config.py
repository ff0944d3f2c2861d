"""Model hyper-parameters, read from a Hugging Face ``config.json``.

One flat dataclass covers both families we run: GPT-2 (learned positions,
LayerNorm, GELU, fused QKV) and Llama (RoPE, RMSNorm, SwiGLU, GQA), with the
Llama-family variants that are a flag away (Qwen2's QKV bias, Llama's
``attention_bias``/``mlp_bias``, Mistral).  DeepSeek-V2/V3 are Llama-family
blocks with two parts swapped, described by nested configs: multi-head latent
attention (``mla``) and mixture-of-experts MLPs (``moe``); their config.json is
read in ``deepseek_config.py``. The attention geometry of every family is read
by ``hf_config.py``, which the memory calculator shares.  Which projections carry a bias
follows transformers' modelling code for each ``model_type``, not just the
config keys: Qwen2 always has a Q/K/V bias and never an output bias, Mistral
has none, Llama's ``attention_bias`` covers q/k/v *and* o_proj.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, fields
from numbers import Real
from pathlib import Path
from typing import Any

from .deepseek_config import MLAConfig, MoEConfig, config_from_hf
from .hf_config import (
    ACTIVATION_NAMES,
    ConfigValueError,
    attention_geometry,
    config_file,
    read_activation,
    read_json_object,
)
from .hf_config import is_int as _is_int
from .rope_config import FrequencyScaling, YarnScaling, read_rope

__all__ = ["SUPPORTED_MODEL_TYPES", "ModelConfig", "MLAConfig", "MoEConfig", "YarnScaling", "FrequencyScaling",
           "ConfigValueError", "read_json_object"]

SUPPORTED_MODEL_TYPES = ("gpt2", "llama", "mistral", "qwen2", "deepseek_v2", "deepseek_v3")


@dataclass(frozen=True)
class ModelConfig:
    arch: str  # "gpt2" or "llama" (mistral and qwen2 run as llama)
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_positions: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = True
    attention_bias: bool = False  # bias on q/k/v projections (GPT-2, Qwen2, Llama attention_bias)
    attention_out_bias: bool | None = None  # bias on the output projection; None: GPT-2 yes, Llama no
    mlp_bias: bool | None = None  # biases on the MLP projections; None: GPT-2 yes, Llama no
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    model_type: str = "llama"
    mla: MLAConfig | None = None  # DeepSeek: latent attention replaces Q/K/V heads
    moe: MoEConfig | None = None  # DeepSeek: experts replace the MLP of layers >= moe.first_dense_layers
    yarn: YarnScaling | None = None
    rope_scaling: FrequencyScaling | None = None  # linear / llama3 (rope_config.py)
    hidden_act: str | None = None  # None: GPT-2 gelu_new, Llama silu

    def __post_init__(self) -> None:
        # None = the architecture's own convention (GPT-2 has every bias, plain Llama none)
        for name in ("attention_out_bias", "mlp_bias"):
            if getattr(self, name) is None:
                object.__setattr__(self, name, self.arch == "gpt2")
        if self.hidden_act is None:
            object.__setattr__(self, "hidden_act", "gelu_new" if self.arch == "gpt2" else "silu")
        self._validate()
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )

    def _validate(self) -> None:
        """Type- and range-check every field (ConfigValueError names it), so nonsense never loads silently."""
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in _POSITIVE_INTS:
                if not _is_int(value) or value < 1:
                    raise ConfigValueError(f.name, value, "must be an integer >= 1")
            elif f.name in ("norm_eps", "rope_theta"):
                if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
                    raise ConfigValueError(f.name, value, "must be a finite number")
                if (f.name == "norm_eps" and value < 0) or (f.name == "rope_theta" and value <= 0):
                    raise ConfigValueError(f.name, value, "must be >= 0" if f.name == "norm_eps" else "must be > 0")
            elif f.name in ("tie_word_embeddings", "attention_bias", "attention_out_bias", "mlp_bias"):
                if not isinstance(value, bool):
                    raise ConfigValueError(f.name, value, "must be true or false")
            elif f.name in ("mla", "moe", "yarn", "rope_scaling"):
                continue  # checked when read (deepseek_config.py, rope_config.py)
            elif f.name == "hidden_act" and value not in ACTIVATION_NAMES:
                raise ConfigValueError(f.name, value, f"is not supported (supported: {', '.join(ACTIVATION_NAMES)})")
            elif f.name == "sliding_window" and value is not None and (not _is_int(value) or value < 1):
                raise ConfigValueError(f.name, value, "must be null or an integer >= 1")
            elif f.name in ("bos_token_id", "eos_token_id") and value is not None:
                ids = value if isinstance(value, list) else [value]
                if not all(_is_int(i) and 0 <= i < self.vocab_size for i in ids):
                    raise ConfigValueError(f.name, value, f"must be null, a token id or a list of token ids in "
                                                          f"[0, vocab_size={self.vocab_size})")
        if self.arch not in ("gpt2", "llama"):
            raise ConfigValueError("arch", self.arch, "must be 'gpt2' or 'llama'")

    # --- what a KV cache stores per token and layer (MLA: one latent "head", its values a prefix of its keys)
    @property
    def cache_kv_heads(self) -> int:
        return 1 if self.mla else self.num_kv_heads

    @property
    def cache_key_dim(self) -> int:
        return self.mla.latent_dim if self.mla else self.head_dim

    @property
    def cache_value_dim(self) -> int:
        return self.mla.kv_lora_rank if self.mla else self.head_dim

    @property
    def values_in_keys(self) -> bool:
        """MLA: the cached values are the first ``cache_value_dim`` channels of the keys, stored once."""
        return self.mla is not None

    def kv_values_per_token(self) -> int:
        """Numbers a full-precision cache stores per token, over every layer."""
        per_layer = self.cache_key_dim if self.values_in_keys else 2 * self.cache_value_dim
        return self.num_layers * self.cache_kv_heads * per_layer

    @property
    def group_size(self) -> int:
        """Query heads per KV head: 1 for MHA, num_heads for MQA, in between for GQA."""
        return self.num_heads // self.num_kv_heads

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, list) else [self.eos_token_id]

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> "ModelConfig":
        """Translate a Hugging Face config dict; unsupported architectures are refused by name, and a bad value
        is named by its config.json key."""
        if not isinstance(cfg, dict):
            raise ValueError(f"config.json must hold a JSON object, got {type(cfg).__name__}")
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            archs = cfg.get("architectures")
            raise ValueError(
                f"unsupported architecture: model_type={model_type!r} architectures={archs}; "
                f"kvcache runs {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        cfg = _without_unusable_token_ids(cfg)
        try:
            if model_type == "gpt2":
                return cls._from_gpt2(cfg)
            if model_type.startswith("deepseek"):
                return config_from_hf(cls, cfg)
            return cls._from_llama(cfg, model_type)
        except KeyError as exc:
            raise ValueError(f"config.json for {model_type} is missing the key {exc.args[0]!r}") from None
        except ConfigValueError as exc:
            key = exc.key or HF_KEYS["gpt2" if model_type == "gpt2" else "llama"].get(exc.field, exc.field)
            raise ConfigValueError(exc.field, exc.value, exc.reason, key) from None
        except TypeError as exc:  # arithmetic on a wrongly typed field while translating
            raise ValueError(f"config.json for {model_type} has a wrongly typed value: {exc}") from None

    @classmethod
    def _from_gpt2(cls, cfg: dict[str, Any]) -> "ModelConfig":
        g = attention_geometry(cfg)
        act = read_activation(cfg, "activation_function", "gelu_new")
        return cls(
            arch="gpt2",
            model_type="gpt2",
            vocab_size=cfg["vocab_size"],
            hidden_size=g.hidden_size,
            num_layers=g.num_layers,
            num_heads=g.num_heads,
            num_kv_heads=g.num_heads,
            head_dim=g.head_dim,
            intermediate_size=4 * g.hidden_size if cfg.get("n_inner") is None else cfg["n_inner"],
            max_positions=g.max_positions or cfg["n_positions"],
            norm_eps=cfg.get("layer_norm_epsilon", 1e-5),
            tie_word_embeddings=cfg.get("tie_word_embeddings", True),
            attention_bias=True,
            attention_out_bias=True,
            mlp_bias=True,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=cfg.get("eos_token_id"),
            hidden_act=act,
        )

    @classmethod
    def _from_llama(cls, cfg: dict[str, Any], model_type: str) -> "ModelConfig":
        g = attention_geometry(cfg)
        act = read_activation(cfg, "hidden_act", "silu")
        rope = read_rope(cfg)
        window = cfg.get("sliding_window") if cfg.get("use_sliding_window", model_type == "mistral") else None
        if model_type == "llama":  # LlamaAttention: attention_bias on q, k, v and o; LlamaMLP: mlp_bias
            qkv_bias = out_bias = bool(cfg.get("attention_bias", False))
            mlp_bias = bool(cfg.get("mlp_bias", False))
        else:  # Qwen2 hard-codes a q/k/v bias (and no other); Mistral has no bias at all
            qkv_bias, out_bias, mlp_bias = model_type == "qwen2", False, False
        return cls(
            arch="llama",
            model_type=model_type,
            vocab_size=cfg["vocab_size"],
            hidden_size=g.hidden_size,
            num_layers=g.num_layers,
            num_heads=g.num_heads,
            num_kv_heads=g.num_kv_heads,
            head_dim=g.head_dim,
            intermediate_size=cfg["intermediate_size"],
            max_positions=g.max_positions or 2048,
            norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=rope.theta,
            rope_scaling=rope.scaling,
            yarn=rope.yarn,
            hidden_act=act,
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            attention_bias=qkv_bias,
            attention_out_bias=out_bias,
            mlp_bias=mlp_bias,
            sliding_window=window,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=cfg.get("eos_token_id"),
        )

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        path = config_file(path)
        data = read_json_object(path)
        try:
            return cls.from_hf(data)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None


SPECIAL_TOKEN_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


def _without_unusable_token_ids(cfg: dict[str, Any]) -> dict[str, Any]:
    """``cfg`` with special token ids outside the vocabulary dropped (``usable_token_ids``)."""
    vocab = cfg.get("vocab_size")
    if not _is_int(vocab) or vocab < 1:
        return cfg  # ModelConfig names it
    return {**cfg, **{key: usable_token_ids(cfg.get(key), vocab, key) for key in SPECIAL_TOKEN_KEYS if key in cfg}}


def usable_token_ids(value: Any, vocab: int, key: str, where: str = "config.json") -> Any:
    """``value`` (an id, a list of ids or null) without the ids outside the vocabulary, with one warning naming
    the field, as transformers loads them (warning they "may result in unexpected behavior"): such an id can
    never be generated, so as a stop token it is absent.  A wrongly typed value is returned as it is."""
    ids = value if isinstance(value, list) else [value]
    if value is None or not all(_is_int(i) for i in ids):
        return value
    kept = [i for i in ids if 0 <= i < vocab]
    if len(kept) == len(ids):
        return value
    warnings.warn(f"{where}: {key} = {value!r} lies outside the vocabulary (vocab_size = {vocab}); "
                  f"treated as {kept if kept else 'absent'}", stacklevel=3)
    return (kept if isinstance(value, list) else kept[0]) if kept else None


_POSITIVE_INTS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                  "intermediate_size", "max_positions")
# our field -> the config.json key it is read from, per family (for error messages)
HF_KEYS = {
    "gpt2": {"vocab_size": "vocab_size", "hidden_size": "n_embd", "num_layers": "n_layer", "num_heads": "n_head",
             "num_kv_heads": "n_head", "head_dim": "n_embd / n_head", "intermediate_size": "n_inner",
             "max_positions": "n_positions", "norm_eps": "layer_norm_epsilon"},
    "llama": {"num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
              "num_kv_heads": "num_key_value_heads", "max_positions": "max_position_embeddings",
              "norm_eps": "rms_norm_eps"},
}
