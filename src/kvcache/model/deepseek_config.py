"""DeepSeek-V2/V3's config.json: latent attention (MLA) and mixture of experts (MoE); rope is rope_config.py's.

Read into the nested configs a ``ModelConfig`` carries (``mla``, ``moe``, ``yarn``) and written back by
``to_hf`` for the exporter. The weights' names and layout are ``deepseek.py``'s.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .hf_config import ConfigValueError, attention_geometry, positive_int, read_activation
from .rope_config import read_rope
from .rope_config import to_hf as rope_to_hf


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


TOPK_METHODS = {"deepseek_v2": ("greedy", "group_limited_greedy"), "deepseek_v3": ("noaux_tc",)}


def config_from_hf(cls, cfg: dict[str, Any]):
    """A ``ModelConfig`` (``cls``) for a deepseek_v2 / deepseek_v3 config.json; options we do not run are refused
    by name."""
    model_type = cfg["model_type"]
    act = read_activation(cfg, "hidden_act", "silu")
    for key in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
        positive_int(cfg, key)  # before the geometry, so a missing latent width is named, not skipped
    g = attention_geometry(cfg)
    if cfg["qk_rope_head_dim"] % 2:
        raise ConfigValueError("qk_rope_head_dim", cfg["qk_rope_head_dim"], "must be even (RoPE rotates pairs)",
                               "qk_rope_head_dim")
    q_lora = cfg.get("q_lora_rank")
    if q_lora is not None:
        positive_int(cfg, "q_lora_rank")
    rope = read_rope(cfg)
    mscale = rope.softmax_mscale
    mla = MLAConfig(cfg["kv_lora_rank"], q_lora, cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"],
                    cfg["v_head_dim"], g.head_dim ** -0.5 * mscale * mscale, rope_interleaved(cfg))
    bias = cfg.get("attention_bias", False)
    if not isinstance(bias, bool):
        raise ConfigValueError("attention_bias", bias, "must be true or false", "attention_bias")
    return cls(
        arch="llama", model_type=model_type, vocab_size=cfg["vocab_size"], hidden_size=g.hidden_size,
        num_layers=g.num_layers, num_heads=g.num_heads, num_kv_heads=g.num_heads,
        head_dim=cfg["qk_rope_head_dim"],  # what RoPE rotates
        intermediate_size=cfg["intermediate_size"], max_positions=g.max_positions or 2048,
        norm_eps=cfg.get("rms_norm_eps", 1e-6), rope_theta=rope.theta,
        tie_word_embeddings=cfg.get("tie_word_embeddings", False),
        attention_bias=bias, attention_out_bias=bias, mlp_bias=False,
        bos_token_id=cfg.get("bos_token_id"), eos_token_id=cfg.get("eos_token_id"),
        mla=mla, moe=_moe(cfg, model_type), yarn=rope.yarn, rope_scaling=rope.scaling, hidden_act=act)


def rope_interleaved(cfg: dict[str, Any]) -> bool:
    return cfg["model_type"] == "deepseek_v2" or bool(cfg.get("rope_interleave", True))


def _moe(cfg: dict[str, Any], model_type: str) -> MoEConfig | None:
    experts = cfg.get("n_routed_experts")
    first_dense = cfg.get("first_k_dense_replace", 0)
    if not experts or first_dense >= cfg["num_hidden_layers"]:
        return None
    for key in ("n_routed_experts", "num_experts_per_tok", "moe_intermediate_size"):
        positive_int(cfg, key)
    method = cfg.get("topk_method", "noaux_tc" if model_type == "deepseek_v3" else "greedy")
    if method not in TOPK_METHODS[model_type]:
        raise ValueError(f"unsupported topk_method {method!r} for {model_type} "
                         f"(supported: {', '.join(TOPK_METHODS[model_type])})")
    groups = cfg.get("n_group") or 1
    topk_groups = cfg.get("topk_group") or groups
    if experts % groups or not 1 <= topk_groups <= groups:
        raise ValueError(f"n_routed_experts={experts}, n_group={groups}, topk_group={topk_groups}: the experts must "
                         "split into n_group equal groups, and 1 <= topk_group <= n_group")
    if cfg["num_experts_per_tok"] > experts:
        raise ValueError(f"num_experts_per_tok={cfg['num_experts_per_tok']} exceeds n_routed_experts={experts}")
    if method == "noaux_tc" and experts // groups < 2:  # a group is scored by its two best experts
        raise ValueError(f"n_routed_experts={experts}, n_group={groups}: noaux_tc scores each group by its two best "
                         "experts, so every group needs at least 2 (transformers cannot run it either)")
    return MoEConfig(experts, cfg["num_experts_per_tok"], cfg.get("n_shared_experts") or 0,
                     cfg["moe_intermediate_size"], first_dense,
                     "sigmoid" if model_type == "deepseek_v3" else "softmax", method, groups, topk_groups,
                     bool(cfg.get("norm_topk_prob", model_type == "deepseek_v3")),
                     float(cfg.get("routed_scaling_factor", 1.0)))


def to_hf(c) -> dict[str, Any]:
    """config.json for a DeepSeek model (the inverse of ``config_from_hf``), for the exporter."""
    m, moe = c.mla, c.moe
    arch = {"deepseek_v2": "DeepseekV2ForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM"}[c.model_type]
    cfg = {"architectures": [arch], "model_type": c.model_type, "vocab_size": c.vocab_size,
           "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size, "num_hidden_layers": c.num_layers,
           "num_attention_heads": c.num_heads, "num_key_value_heads": c.num_heads, "hidden_act": c.hidden_act,
           "max_position_embeddings": c.max_positions, "rms_norm_eps": c.norm_eps,
           "kv_lora_rank": m.kv_lora_rank, "q_lora_rank": m.q_lora_rank, "qk_nope_head_dim": m.qk_nope_head_dim,
           "qk_rope_head_dim": m.qk_rope_head_dim, "v_head_dim": m.v_head_dim, "attention_bias": c.attention_bias,
           "rope_parameters": rope_to_hf(c.rope_theta, c.rope_scaling, c.yarn),
           "tie_word_embeddings": c.tie_word_embeddings, "bos_token_id": c.bos_token_id,
           "eos_token_id": c.eos_token_id, "torch_dtype": "float32"}
    if c.model_type == "deepseek_v3":
        cfg["rope_interleave"] = m.rope_interleave
    elif not m.rope_interleave:
        raise ValueError("a deepseek_v2 checkpoint always stores interleaved rope rows")
    if moe is None:
        cfg.update(first_k_dense_replace=c.num_layers)
    else:
        cfg.update(n_routed_experts=moe.num_experts, num_experts_per_tok=moe.experts_per_token,
                   n_shared_experts=moe.shared_experts, moe_intermediate_size=moe.intermediate_size,
                   first_k_dense_replace=moe.first_dense_layers, topk_method=moe.topk_method, n_group=moe.num_groups,
                   topk_group=moe.topk_groups, norm_topk_prob=moe.norm_topk_prob,
                   routed_scaling_factor=moe.routed_scaling_factor)
    return cfg
