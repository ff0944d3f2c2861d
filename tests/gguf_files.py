"""Write small GGUF files from random transformers models, the way llama.cpp's converter does.

Q/K rows are permuted as llama.cpp's ``convert_hf_to_gguf.py`` permutes them, tensors are quantized with
``gguf.quants``, and the vocabulary is a byte-level BPE (the 256 byte symbols, two merges, two control tokens).
"""

from __future__ import annotations

import numpy as np
import torch


def byte_symbols() -> list[str]:
    """GPT-2's byte-to-unicode table, in byte order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, cs))
    return [chr(table[b]) for b in range(256)]


VOCAB = byte_symbols() + ["Ġt", "Ġth", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "Ġt h"]
TEMPLATE = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
            "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def llama_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's permutation of Q/K rows (HF's rotary pairs (i, i+d/2) -> interleaved (2i, 2i+1))."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def random_hf_model(arch: str = "llama", tie: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    cfg = dict(vocab_size=len(VOCAB), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5,
               rope_theta=10000.0, tie_word_embeddings=tie, bos_token_id=256 + 2, eos_token_id=256 + 3)
    torch.manual_seed(0)
    model = (LlamaForCausalLM(LlamaConfig(**cfg)) if arch == "llama" else
             Qwen2ForCausalLM(Qwen2Config(**cfg, use_sliding_window=False)))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 or name.endswith(".bias"):
                p.normal_(0, 0.2)
    return model.eval()


def write_gguf(path, model, qtype: str = "F32", arch: str | None = None, skip: tuple[str, ...] = (),
               tokenizer_model: str = "gpt2", permute: bool = True) -> None:
    """``model`` (a transformers Llama/Qwen2) as a GGUF file; matrices stored as ``qtype``; ``skip`` drops keys."""
    import gguf
    from gguf.quants import quantize

    c = model.config
    arch = arch or c.model_type
    w = gguf.GGUFWriter(str(path), arch)

    def meta(key, add, *value):
        if key not in skip:
            add(*value)

    meta("context_length", w.add_context_length, c.max_position_embeddings)
    meta("embedding_length", w.add_embedding_length, c.hidden_size)
    meta("block_count", w.add_block_count, c.num_hidden_layers)
    meta("feed_forward_length", w.add_feed_forward_length, c.intermediate_size)
    meta("head_count", w.add_head_count, c.num_attention_heads)
    meta("head_count_kv", w.add_head_count_kv, c.num_key_value_heads)
    meta("rms_eps", w.add_layer_norm_rms_eps, c.rms_norm_eps)
    meta("freq_base", w.add_rope_freq_base, 10000.0)
    meta("tokenizer_model", w.add_tokenizer_model, tokenizer_model)
    w.add_tokenizer_pre("gpt2")
    meta("tokens", w.add_token_list, VOCAB)
    w.add_token_types([1] * 258 + [3, 3])
    w.add_token_merges(MERGES)
    w.add_bos_token_id(c.bos_token_id)
    w.add_eos_token_id(c.eos_token_id)
    w.add_chat_template(TEMPLATE)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    layer = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    state = model.state_dict()
    if c.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    for hf_name, tensor in state.items():
        if hf_name in names:
            name = names[hf_name]
        else:
            parts = hf_name.split(".")  # model.layers.{i}.{module...}.{weight|bias}
            name = f"blk.{parts[2]}.{layer['.'.join(parts[3:-1])]}.{parts[-1]}"
        data = tensor.float().numpy()
        if permute and c.model_type == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
            heads = c.num_attention_heads if "attn_q" in name else c.num_key_value_heads
            data = llama_permute(data, heads)
        if data.ndim == 2 and qtype != "F32":
            kind = getattr(gguf.GGMLQuantizationType, qtype)
            w.add_tensor(name, quantize(data, kind), raw_dtype=kind)
        else:
            w.add_tensor(name, np.ascontiguousarray(data))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
