"""DeepSeek-V2/V3 checkpoints: the one table of weight names the loader and exporter share (config.json is
``deepseek_config.py``'s).

The blocks are Llama's (RMSNorm, SwiGLU, RoPE) with latent attention (``mla.py``) and, from layer
``first_k_dense_replace`` on, a mixture of experts (``moe.py``), as transformers defines them.

RoPE layout: V2 always, and V3 with ``rope_interleave``, rotate interleaved pairs (2i, 2i+1). The loader
permutes the rope rows of the query and ``kv_a_proj`` weights to the half-split layout (i, i + d/2), and
the exporter permutes them back. The model then rotates like Llama, and dot products are unchanged,
because queries and keys are permuted alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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
