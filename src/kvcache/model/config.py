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
from dataclasses import dataclass, fields
from numbers import Real
from pathlib import Path
from typing import Any

from .deepseek_config import MLAConfig, MoEConfig, YarnScaling, config_from_hf
from .hf_config import ConfigValueError, attention_geometry, config_file, read_json_object
from .hf_config import is_int as _is_int

__all__ = ["SUPPORTED_MODEL_TYPES", "ModelConfig", "MLAConfig", "MoEConfig", "YarnScaling", "ConfigValueError",
           "read_json_object"]

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

    def __post_init__(self) -> None:
        # None = the architecture's own convention (GPT-2 has every bias, plain Llama none)
        for name in ("attention_out_bias", "mlp_bias"):
            if getattr(self, name) is None:
                object.__setattr__(self, name, self.arch == "gpt2")
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
            elif f.name in ("mla", "moe", "yarn"):
                continue  # checked when read (deepseek.py)
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
        act = cfg.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"unsupported GPT-2 activation_function {act!r} (supported: gelu_new)")
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
        )

    @classmethod
    def _from_llama(cls, cfg: dict[str, Any], model_type: str) -> "ModelConfig":
        g = attention_geometry(cfg)
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"unsupported hidden_act {act!r} (supported: silu)")
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ValueError(f"unsupported rope scaling {rope_type!r} (supported: default)")
        theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
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
            rope_theta=theta,
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
