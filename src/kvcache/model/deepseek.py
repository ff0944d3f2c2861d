"""DeepSeek-V2/V3 checkpoints: config.json, and the one table of weight names the loader and exporter share.

The blocks are Llama's (RMSNorm, SwiGLU, RoPE) with latent attention (``mla.py``) and, from layer
``first_k_dense_replace`` on, a mixture of experts (``moe.py``), as transformers defines them.

RoPE layout: V2 always, and V3 with ``rope_interleave``, rotate interleaved pairs (2i, 2i+1). The loader
permutes the rope rows of the query and ``kv_a_proj`` weights to the half-split layout (i, i + d/2), and
the exporter permutes them back. The model then rotates like Llama, and dot products are unchanged,
because queries and keys are permuted alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from .config import ConfigValueError, MLAConfig, MoEConfig, YarnScaling, _dims, _is_int

TOPK_METHODS = {"deepseek_v2": ("greedy", "group_limited_greedy"), "deepseek_v3": ("noaux_tc",)}


def config_from_hf(cls, cfg: dict[str, Any]):
    """A ``ModelConfig`` for a deepseek_v2 / deepseek_v3 config.json; options we do not run are refused by name."""
    model_type = cfg["model_type"]
    hidden, heads = _dims(cfg, "hidden_size", "num_attention_heads", cfg.get("qk_rope_head_dim"))
    if cfg.get("hidden_act", "silu") != "silu":
        raise ValueError(f"unsupported hidden_act {cfg.get('hidden_act')!r} (supported: silu)")
    # num_key_value_heads means nothing to latent attention (every head reads the one latent): not read
    for key in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
        _positive(cfg, key)
    if cfg["qk_rope_head_dim"] % 2:
        raise ConfigValueError("qk_rope_head_dim", cfg["qk_rope_head_dim"], "must be even (RoPE rotates pairs)",
                               "qk_rope_head_dim")
    q_lora = cfg.get("q_lora_rank")
    if q_lora is not None:
        _positive(cfg, "q_lora_rank")
    rope, theta = _rope(cfg)
    yarn, mscale = _yarn(cfg, rope)
    qk_dim = cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"]
    mla = MLAConfig(cfg["kv_lora_rank"], q_lora, cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"],
                    cfg["v_head_dim"], qk_dim ** -0.5 * mscale * mscale, rope_interleaved(cfg))
    bias = cfg.get("attention_bias", False)
    if not isinstance(bias, bool):
        raise ConfigValueError("attention_bias", bias, "must be true or false", "attention_bias")
    return cls(
        arch="llama", model_type=model_type, vocab_size=cfg["vocab_size"], hidden_size=hidden,
        num_layers=cfg["num_hidden_layers"], num_heads=heads, num_kv_heads=heads,
        head_dim=cfg["qk_rope_head_dim"],  # what RoPE rotates
        intermediate_size=cfg["intermediate_size"], max_positions=cfg.get("max_position_embeddings", 2048),
        norm_eps=cfg.get("rms_norm_eps", 1e-6), rope_theta=theta,
        tie_word_embeddings=cfg.get("tie_word_embeddings", False),
        attention_bias=bias, attention_out_bias=bias, mlp_bias=False,
        bos_token_id=cfg.get("bos_token_id"), eos_token_id=cfg.get("eos_token_id"),
        mla=mla, moe=_moe(cfg, model_type), yarn=yarn)


def rope_interleaved(cfg: dict[str, Any]) -> bool:
    return cfg["model_type"] == "deepseek_v2" or bool(cfg.get("rope_interleave", True))


def _positive(cfg: dict[str, Any], key: str) -> None:
    if not _is_int(cfg.get(key)) or cfg[key] < 1:
        raise ConfigValueError(key, cfg.get(key), "must be an integer >= 1", key)


def _rope(cfg: dict[str, Any]) -> tuple[dict[str, Any], float]:
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise ConfigValueError("rope_parameters", rope, "must be an object", "rope_parameters")
    return rope, rope.get("rope_theta", cfg.get("rope_theta", 10000.0))


def _yarn(cfg: dict[str, Any], rope: dict[str, Any]) -> tuple[YarnScaling | None, float]:
    """(YaRN scaling or None, the mscale that multiplies the softmax scale twice)."""
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return None, 1.0
    if kind != "yarn":
        raise ValueError(f"unsupported rope scaling {kind!r} for {cfg['model_type']} (supported: default, yarn)")
    original = rope.get("original_max_position_embeddings")
    if not _is_int(original) or original < 1:
        raise ConfigValueError("original_max_position_embeddings", original, "must be an integer >= 1 for yarn",
                               "rope_parameters.original_max_position_embeddings")
    factor = rope.get("factor") or cfg.get("max_position_embeddings", 2048) / original

    def get_mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    mscale, mscale_all = rope.get("mscale"), rope.get("mscale_all_dim")
    attention_factor = rope.get("attention_factor")
    if attention_factor is None:
        attention_factor = (get_mscale(factor, mscale) / get_mscale(factor, mscale_all) if mscale and mscale_all
                            else get_mscale(factor))
    yarn = YarnScaling(float(factor), original, float(rope.get("beta_fast") or 32), float(rope.get("beta_slow") or 1),
                       float(attention_factor), bool(rope.get("truncate", True)), mscale, mscale_all)
    return yarn, (get_mscale(factor, mscale_all) if mscale_all else 1.0)


def _moe(cfg: dict[str, Any], model_type: str) -> MoEConfig | None:
    experts = cfg.get("n_routed_experts")
    first_dense = cfg.get("first_k_dense_replace", 0)
    if not experts or first_dense >= cfg["num_hidden_layers"]:
        return None
    for key in ("n_routed_experts", "num_experts_per_tok", "moe_intermediate_size"):
        _positive(cfg, key)
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
    return MoEConfig(experts, cfg["num_experts_per_tok"], cfg.get("n_shared_experts") or 0,
                     cfg["moe_intermediate_size"], first_dense,
                     "sigmoid" if model_type == "deepseek_v3" else "softmax", method, groups, topk_groups,
                     bool(cfg.get("norm_topk_prob", model_type == "deepseek_v3")),
                     float(cfg.get("routed_scaling_factor", 1.0)))


# --- the weight table --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Weight:
    """One tensor of ours, made of checkpoint tensors ``parts`` (concatenated along rows; ``experts``: one per
    expert, stacked), with the rope rows permuted when ``rope`` names how."""

    ours: str
    parts: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    experts: int = 0  # > 0: parts hold "{e}" for the expert index
    rope: str | None = None  # "heads": per-head q rows; "tail": the last rope rows of kv_a_proj


def weight_table(c) -> list[Weight]:
    """Every tensor of a DeepSeek model, with the checkpoint names it comes from (without the 'model.' prefix)."""
    m, H = c.mla, c.hidden_size
    qk = m.qk_nope_head_dim + m.qk_rope_head_dim
    q_out = c.num_heads * qk
    table = [Weight("embed.weight", ("embed_tokens.weight",), ((c.vocab_size, H),)),
             Weight("norm.weight", ("norm.weight",), ((H,),))]
    for i in range(c.num_layers):
        o, p = f"layers.{i}.", f"layers.{i}."
        a = p + "self_attn."
        table += [Weight(o + "attn_norm.weight", (p + "input_layernorm.weight",), ((H,),)),
                  Weight(o + "mlp_norm.weight", (p + "post_attention_layernorm.weight",), ((H,),))]
        if m.q_lora_rank is None:
            table.append(Weight(o + "attn.q_proj.weight", (a + "q_proj.weight",), ((q_out, H),), rope="heads"))
        else:
            r = m.q_lora_rank
            table += [Weight(o + "attn.q_a_proj.weight", (a + "q_a_proj.weight",), ((r, H),)),
                      Weight(o + "attn.q_a_norm.weight", (a + "q_a_layernorm.weight",), ((r,),)),
                      Weight(o + "attn.q_b_proj.weight", (a + "q_b_proj.weight",), ((q_out, r),), rope="heads")]
            if c.attention_bias:
                table.append(Weight(o + "attn.q_a_proj.bias", (a + "q_a_proj.bias",), ((r,),)))
        table += [Weight(o + "attn.kv_a_proj.weight", (a + "kv_a_proj_with_mqa.weight",), ((m.latent_dim, H),),
                         rope="tail"),
                  Weight(o + "attn.kv_a_norm.weight", (a + "kv_a_layernorm.weight",), ((m.kv_lora_rank,),)),
                  Weight(o + "attn.kv_b_proj.weight", (a + "kv_b_proj.weight",),
                         ((c.num_heads * (m.qk_nope_head_dim + m.v_head_dim), m.kv_lora_rank),)),
                  Weight(o + "attn.out.weight", (a + "o_proj.weight",), ((H, c.num_heads * m.v_head_dim),))]
        if c.attention_bias:
            table += [Weight(o + "attn.kv_a_proj.bias", (a + "kv_a_proj_with_mqa.bias",), ((m.latent_dim,),),
                             rope="tail"),
                      Weight(o + "attn.out.bias", (a + "o_proj.bias",), ((H,),))]
        table += _mlp_weights(c, i, o + "mlp.", p + "mlp.")
    return table


def _mlp_weights(c, layer: int, o: str, p: str) -> list[Weight]:
    H, moe = c.hidden_size, c.moe
    if moe is None or layer < moe.first_dense_layers:
        inter = c.intermediate_size
        return [Weight(o + "up.weight", (p + "gate_proj.weight", p + "up_proj.weight"), ((inter, H), (inter, H))),
                Weight(o + "down.weight", (p + "down_proj.weight",), ((H, inter),))]
    inter, E = moe.intermediate_size, moe.num_experts
    table = [Weight(o + "router", (p + "gate.weight",), ((E, H),)),
             Weight(o + "experts_up", (p + "experts.{e}.gate_proj.weight", p + "experts.{e}.up_proj.weight"),
                    ((inter, H), (inter, H)), experts=E),
             Weight(o + "experts_down", (p + "experts.{e}.down_proj.weight",), ((H, inter),), experts=E)]
    if moe.scoring == "sigmoid":
        table.append(Weight(o + "router_bias", (p + "gate.e_score_correction_bias",), ((E,),)))
    if moe.shared_experts:
        shared = inter * moe.shared_experts
        table += [Weight(o + "shared.up.weight", (p + "shared_experts.gate_proj.weight",
                                                  p + "shared_experts.up_proj.weight"), ((shared, H), (shared, H))),
                  Weight(o + "shared.down.weight", (p + "shared_experts.down_proj.weight",), ((H, shared),))]
    return table


def rope_rows(c, kind: str, to_half: bool) -> torch.Tensor:
    """Row order that turns interleaved rope rows into half-split ones (``to_half``) or back."""
    m = c.mla
    rope = torch.arange(m.qk_rope_head_dim)
    order = torch.cat([rope[0::2], rope[1::2]])  # interleaved -> half-split
    if not to_half:
        order = torch.argsort(order)
    if kind == "tail":
        return torch.cat([torch.arange(m.kv_lora_rank), m.kv_lora_rank + order])
    qk = m.qk_nope_head_dim + m.qk_rope_head_dim
    per_head = torch.cat([torch.arange(m.qk_nope_head_dim), m.qk_nope_head_dim + order])
    return torch.cat([h * qk + per_head for h in range(c.num_heads)])


def load_state(c, take) -> dict[str, torch.Tensor]:
    """Our state dict from the checkpoint; ``take(name, shape)`` checks and returns one checkpoint tensor."""
    state = {}
    for w in weight_table(c):
        if w.experts:
            t = torch.stack([torch.cat([take(n.format(e=e), s) for n, s in zip(w.parts, w.shapes)])
                             for e in range(w.experts)])
        else:
            t = torch.cat([take(n, s) for n, s in zip(w.parts, w.shapes)])
        if w.rope and c.mla.rope_interleave:
            t = t[rope_rows(c, w.rope, to_half=True)]
        state[w.ours] = t
    return state


def export_state(c, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors (without the 'model.' prefix) from our state dict: ``load_state`` inverted."""
    out = {}
    for w in weight_table(c):
        t = state[w.ours]
        if w.rope and c.mla.rope_interleave:
            t = t[rope_rows(c, w.rope, to_half=False)]
        sizes = [s[0] for s in w.shapes]
        if w.experts:
            for e in range(w.experts):
                for name, part in zip(w.parts, t[e].split(sizes)):
                    out[name.format(e=e)] = part
        else:
            for name, part in zip(w.parts, t.split(sizes) if len(w.parts) > 1 else [t]):
                out[name] = part
    return out


def hf_config(c) -> dict[str, Any]:
    """config.json for a DeepSeek model (the inverse of ``config_from_hf``)."""
    m, moe = c.mla, c.moe
    arch = {"deepseek_v2": "DeepseekV2ForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM"}[c.model_type]
    cfg = {"architectures": [arch], "model_type": c.model_type, "vocab_size": c.vocab_size,
           "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size, "num_hidden_layers": c.num_layers,
           "num_attention_heads": c.num_heads, "num_key_value_heads": c.num_heads, "hidden_act": "silu",
           "max_position_embeddings": c.max_positions, "rms_norm_eps": c.norm_eps,
           "kv_lora_rank": m.kv_lora_rank, "q_lora_rank": m.q_lora_rank, "qk_nope_head_dim": m.qk_nope_head_dim,
           "qk_rope_head_dim": m.qk_rope_head_dim, "v_head_dim": m.v_head_dim, "attention_bias": c.attention_bias,
           "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
           "tie_word_embeddings": c.tie_word_embeddings, "bos_token_id": c.bos_token_id,
           "eos_token_id": c.eos_token_id, "torch_dtype": "float32"}
    if c.yarn is not None:
        y = c.yarn
        cfg["rope_parameters"] = {"rope_type": "yarn", "rope_theta": c.rope_theta, "factor": y.factor,
                                  "original_max_position_embeddings": y.original_max_positions,
                                  "beta_fast": y.beta_fast, "beta_slow": y.beta_slow, "truncate": y.truncate,
                                  "attention_factor": y.attention_factor, "mscale": y.mscale,
                                  "mscale_all_dim": y.mscale_all_dim}
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
