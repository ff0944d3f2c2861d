"""Model hyper-parameters, read from a Hugging Face ``config.json``.

One flat dataclass covers both families we run: GPT-2 (learned positions,
LayerNorm, GELU, fused QKV) and Llama (RoPE, RMSNorm, SwiGLU, GQA), with the
Llama-family variants that are a flag away (Qwen2's QKV bias, Llama's
``attention_bias``/``mlp_bias``, Mistral).  Which projections carry a bias
follows transformers' modelling code for each ``model_type``, not just the
config keys: Qwen2 always has a Q/K/V bias and never an output bias, Mistral
has none, Llama's ``attention_bias`` covers q/k/v *and* o_proj.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUPPORTED_MODEL_TYPES = ("gpt2", "llama", "mistral", "qwen2")


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

    def __post_init__(self) -> None:
        # None = the architecture's own convention (GPT-2 has every bias, plain Llama none)
        for name in ("attention_out_bias", "mlp_bias"):
            if getattr(self, name) is None:
                object.__setattr__(self, name, self.arch == "gpt2")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )

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
        """Translate a Hugging Face config dict; unsupported architectures are refused by name."""
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
            return cls._from_llama(cfg, model_type)
        except KeyError as exc:
            raise ValueError(f"config.json for {model_type} is missing the key {exc.args[0]!r}") from None

    @classmethod
    def _from_gpt2(cls, cfg: dict[str, Any]) -> "ModelConfig":
        hidden, heads = cfg["n_embd"], cfg["n_head"]
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
            intermediate_size=cfg.get("n_inner") or 4 * hidden,
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
        hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
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
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or hidden // heads,
            intermediate_size=cfg["intermediate_size"],
            max_positions=cfg.get("max_position_embeddings", 2048),
            norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
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
        return cls.from_hf(json.loads(path.read_text()))
