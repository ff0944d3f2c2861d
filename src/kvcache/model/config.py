"""Model hyper-parameters, read from a Hugging Face ``config.json``.

One flat dataclass covers both families we run: GPT-2 (learned positions,
LayerNorm, GELU, fused QKV) and Llama (RoPE, RMSNorm, SwiGLU, GQA), with the
Llama-family variants that are a flag away (Qwen2's QKV bias, Llama's
``attention_bias``/``mlp_bias``, Mistral).  DeepSeek-V2/V3 are Llama-family
blocks with two parts swapped, described by nested configs: multi-head latent
attention (``mla``) and mixture-of-experts MLPs (``moe``); their config.json is
read in ``deepseek.py``.  Which projections carry a bias
follows transformers' modelling code for each ``model_type``, not just the
config keys: Qwen2 always has a Q/K/V bias and never an output bias, Mistral
has none, Llama's ``attention_bias`` covers q/k/v *and* o_proj.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from numbers import Integral, Real
from pathlib import Path
from typing import Any

SUPPORTED_MODEL_TYPES = ("gpt2", "llama", "mistral", "qwen2", "deepseek_v2", "deepseek_v3")


@dataclass(frozen=True)
class MLAConfig:
    """Multi-head latent attention: what each token caches is ``kv_lora_rank + qk_rope_head_dim`` values."""

    kv_lora_rank: int  # width of the compressed latent c_kv (the values, after absorption)
    q_lora_rank: int | None  # None: one q_proj; else q_a_proj -> RMSNorm -> q_b_proj
    qk_nope_head_dim: int
    qk_rope_head_dim: int  # the shared RoPE key k_pe, cached beside c_kv
    v_head_dim: int
    softmax_scale: float  # (nope + rope)^-0.5, times YaRN's mscale^2 when the rope scaling asks for it
    rope_interleave: bool = True  # the checkpoint's rope rows rotate pairs (2i, 2i+1) (deepseek.py permutes them)

    @property
    def latent_dim(self) -> int:
        return self.kv_lora_rank + self.qk_rope_head_dim


@dataclass(frozen=True)
class MoEConfig:
    """DeepSeek's mixture of experts: routed experts picked per token, plus always-on shared experts."""

    num_experts: int
    experts_per_token: int
    shared_experts: int
    intermediate_size: int  # per expert
    first_dense_layers: int  # layers before this one keep a dense MLP
    scoring: str  # "sigmoid" (V3, with a correction bias) or "softmax" (V2)
    topk_method: str  # "noaux_tc" (V3: group-limited by top-2 sums), "greedy" or "group_limited_greedy" (V2)
    num_groups: int
    topk_groups: int
    norm_topk_prob: bool
    routed_scaling_factor: float


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
                from .deepseek import config_from_hf

                return config_from_hf(cls, cfg)
            return cls._from_llama(cfg, model_type)
        except KeyError as exc:
            raise ValueError(f"config.json for {model_type} is missing the key {exc.args[0]!r}") from None
        except ConfigValueError as exc:
            key = HF_KEYS["gpt2" if model_type == "gpt2" else "llama"].get(exc.field, exc.field)
            raise ConfigValueError(exc.field, exc.value, exc.reason, key) from None
        except TypeError as exc:  # arithmetic on a wrongly typed field while translating
            raise ValueError(f"config.json for {model_type} has a wrongly typed value: {exc}") from None

    @classmethod
    def _from_gpt2(cls, cfg: dict[str, Any]) -> "ModelConfig":
        hidden, heads = _dims(cfg, "n_embd", "n_head", cfg.get("head_dim"))
        act = cfg.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"unsupported GPT-2 activation_function {act!r} (supported: gelu_new)")
        return cls(
            arch="gpt2",
            model_type="gpt2",
            vocab_size=cfg["vocab_size"],
            hidden_size=hidden,
            num_layers=cfg["n_layer"],
            num_heads=heads,
            num_kv_heads=heads,
            head_dim=hidden // heads,
            intermediate_size=4 * hidden if cfg.get("n_inner") is None else cfg["n_inner"],
            max_positions=cfg["n_positions"],
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
        hidden, heads = _dims(cfg, "hidden_size", "num_attention_heads", cfg.get("head_dim"))
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
            hidden_size=hidden,
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=heads if cfg.get("num_key_value_heads") is None else cfg["num_key_value_heads"],
            head_dim=hidden // heads if cfg.get("head_dim") is None else cfg["head_dim"],
            intermediate_size=cfg["intermediate_size"],
            max_positions=cfg.get("max_position_embeddings", 2048),
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
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.exists():
            raise FileNotFoundError(f"no config.json at {path}")
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


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON file that must hold an object (config.json, tokenizer_config.json, ...); ValueError naming it."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: must hold a JSON object, got {type(data).__name__}")
    return data


def _dims(cfg: dict[str, Any], hidden_key: str, heads_key: str, head_dim: Any) -> tuple[int, int]:
    """The hidden size and head count, checked before anything divides by them."""
    hidden, heads = cfg[hidden_key], cfg[heads_key]
    for key, value in ((hidden_key, hidden), (heads_key, heads)):
        if not _is_int(value) or value < 1:
            raise ConfigValueError(key, value, "must be an integer >= 1", key)
    if head_dim is None and hidden % heads:
        raise ConfigValueError(hidden_key, hidden, f"must be a multiple of {heads_key} = {heads} (no head_dim given)",
                               hidden_key)
    return hidden, heads


def _is_int(value: Any) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


class ConfigValueError(ValueError):
    """A config value of the wrong type or out of range, named by field (and config.json key) and value."""

    def __init__(self, field: str, value: Any, reason: str, key: str | None = None):
        self.field, self.value, self.reason = field, value, reason
        name = f"{key!r}" if key and key == field else f"{key!r} ({field})" if key else f"{field!r}"
        super().__init__(f"{name} = {value!r} {reason}")
