"""Write a ``Transformer`` as a standard Hugging Face checkpoint folder.

The inverse of ``loader``: fused Q/K/V and gate/up weights are split back into
the per-projection tensors transformers expects, so the folder loads both in
kvcache and in ``transformers`` (``LlamaForCausalLM`` / ``GPT2LMHeadModel``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .rope_config import to_hf as rope_to_hf
from .transformer import Transformer


def _check_biases(c) -> None:
    """transformers ties biases to the model type; refuse a combination it cannot express."""
    got = (c.attention_bias, c.attention_out_bias, c.mlp_bias)
    fixed = {"gpt2": (True, True, True), "qwen2": (True, False, False), "mistral": (False, False, False)}
    if c.model_type == "llama":
        ok = c.attention_bias == c.attention_out_bias  # one attention_bias flag covers q/k/v and o
    else:
        ok = got == fixed[c.model_type]
    if not ok:
        raise ValueError(f"a {c.model_type} checkpoint cannot express qkv/out/mlp biases {got} in transformers")


def hf_config(model: Transformer) -> dict[str, Any]:
    c = model.config
    if c.mla is not None:
        from .deepseek_config import to_hf as deepseek_config

        return deepseek_config(c)
    _check_biases(c)
    if c.arch == "gpt2":
        return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": c.vocab_size,
                "n_positions": c.max_positions, "n_embd": c.hidden_size, "n_layer": c.num_layers,
                "n_head": c.num_heads, "n_inner": c.intermediate_size, "activation_function": c.hidden_act,
                "layer_norm_epsilon": c.norm_eps, "bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_id,
                "tie_word_embeddings": True, "torch_dtype": "float32"}
    arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}[c.model_type]
    extra = {}
    if c.model_type == "mistral":
        extra["sliding_window"] = c.sliding_window
    if c.model_type == "qwen2":
        extra["use_sliding_window"] = False
    return {"architectures": [arch], "model_type": c.model_type, "vocab_size": c.vocab_size, **extra,
            "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
            "num_hidden_layers": c.num_layers, "num_attention_heads": c.num_heads,
            "num_key_value_heads": c.num_kv_heads, "head_dim": c.head_dim, "hidden_act": c.hidden_act,
            "max_position_embeddings": c.max_positions, "rms_norm_eps": c.norm_eps,
            "rope_parameters": rope_to_hf(c.rope_theta, c.rope_scaling, c.yarn),
            "attention_bias": c.attention_bias, "mlp_bias": c.mlp_bias, "tie_word_embeddings": c.tie_word_embeddings,
            "bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_id, "torch_dtype": "float32"}


def hf_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    c, s = model.config, model.state_dict()
    for name, module in model.named_modules():  # matrices held in a GGUF format: their float32 values
        if hasattr(module, "qweight"):
            s[name + ".weight"] = module.weight
    if c.mla is not None:
        from .deepseek import export_state

        out = {"model." + k: v for k, v in export_state(c, s).items()}
        if not c.tie_word_embeddings:
            out["lm_head.weight"] = s["lm_head.weight"]
        return {k: v.contiguous() for k, v in out.items()}
    _check_biases(c)
    out: dict[str, torch.Tensor] = {}
    if c.arch == "gpt2":
        out["transformer.wte.weight"] = s["embed.weight"]
        out["transformer.wpe.weight"] = s["pos_embed.weight"]
        out["transformer.ln_f.weight"], out["transformer.ln_f.bias"] = s["norm.weight"], s["norm.bias"]
        for i in range(c.num_layers):
            p, o = f"transformer.h.{i}.", f"layers.{i}."
            for hf, ours in (("ln_1", "attn_norm"), ("ln_2", "mlp_norm")):
                out[p + hf + ".weight"], out[p + hf + ".bias"] = s[o + ours + ".weight"], s[o + ours + ".bias"]
            for hf, ours in (("attn.c_attn", "attn.qkv"), ("attn.c_proj", "attn.out"),
                             ("mlp.c_fc", "mlp.up"), ("mlp.c_proj", "mlp.down")):
                out[p + hf + ".weight"] = s[o + ours + ".weight"].t()
                out[p + hf + ".bias"] = s[o + ours + ".bias"]
        return {k: v.contiguous() for k, v in out.items()}
    q, kv, inter = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.intermediate_size
    out["model.embed_tokens.weight"] = s["embed.weight"]
    out["model.norm.weight"] = s["norm.weight"]
    if not c.tie_word_embeddings:
        out["lm_head.weight"] = s["lm_head.weight"]
    for i in range(c.num_layers):
        p, o = f"model.layers.{i}.", f"layers.{i}."
        out[p + "input_layernorm.weight"] = s[o + "attn_norm.weight"]
        out[p + "post_attention_layernorm.weight"] = s[o + "mlp_norm.weight"]
        for name, t in zip(("q_proj", "k_proj", "v_proj"), s[o + "attn.qkv.weight"].split((q, kv, kv))):
            out[p + f"self_attn.{name}.weight"] = t
        if c.attention_bias:
            for name, t in zip(("q_proj", "k_proj", "v_proj"), s[o + "attn.qkv.bias"].split((q, kv, kv))):
                out[p + f"self_attn.{name}.bias"] = t
        out[p + "self_attn.o_proj.weight"] = s[o + "attn.out.weight"]
        if c.attention_out_bias:
            out[p + "self_attn.o_proj.bias"] = s[o + "attn.out.bias"]
        for kind in ("weight", "bias") if c.mlp_bias else ("weight",):
            gate, up = s[o + f"mlp.up.{kind}"].split((inter, inter))
            out[p + f"mlp.gate_proj.{kind}"], out[p + f"mlp.up_proj.{kind}"] = gate, up
            out[p + f"mlp.down_proj.{kind}"] = s[o + f"mlp.down.{kind}"]
    return {k: v.contiguous() for k, v in out.items()}


def save_hf_checkpoint(model: Transformer, folder: str | Path, tokenizer_file: str | Path | None = None,
                       extra_files: dict[str, Any] | None = None) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to(torch.float32).cpu() for k, v in hf_state_dict(model).items()}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(hf_config(model), indent=2) + "\n")
    c = model.config
    gen = {"bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_id, "do_sample": False}
    (folder / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    if tokenizer_file is not None:
        shutil.copy(tokenizer_file, folder / "tokenizer.json")
    for name, content in (extra_files or {}).items():
        (folder / name).write_text(json.dumps(content, indent=2) + "\n")
    return folder
