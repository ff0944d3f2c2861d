"""Load a local Hugging Face checkpoint folder into a ``Transformer``.

A folder holds ``config.json``, ``*.safetensors`` (one file or shards) and
optionally ``tokenizer.json``.  Checkpoint names are mapped onto ours and the
Q/K/V (and gate/up) projections are concatenated into the fused weights the
model uses.  Every expected tensor is checked by name and shape, so a wrong
or truncated checkpoint fails with the tensor it is about.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from .config import ModelConfig
from .tokenizer import Tokenizer
from .transformer import Transformer

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "data" / "default_model"


class CheckpointError(ValueError):
    """A checkpoint is missing a tensor or holds one of the wrong shape."""


def read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors file in {folder}")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                tensors[name] = f.get_tensor(name)
    return tensors


class _Checkpoint:
    """Name-and-shape-checked access to the checkpoint's tensors."""

    def __init__(self, tensors: dict[str, torch.Tensor], prefix: str):
        self.tensors, self.prefix = tensors, prefix

    def has(self, name: str) -> bool:
        return self.prefix + name in self.tensors or name in self.tensors

    def take(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        full = self.prefix + name if self.prefix + name in self.tensors else name
        if full not in self.tensors:
            raise CheckpointError(f"checkpoint is missing tensor {self.prefix + name!r}")
        t = self.tensors[full]
        if tuple(t.shape) != shape:
            raise CheckpointError(f"checkpoint tensor {full!r} has shape {tuple(t.shape)}, expected {shape}")
        return t


def _gpt2_state(c: ModelConfig, ckpt: _Checkpoint) -> dict[str, torch.Tensor]:
    H, I = c.hidden_size, c.intermediate_size
    s = {"embed.weight": ckpt.take("wte.weight", (c.vocab_size, H)),
         "pos_embed.weight": ckpt.take("wpe.weight", (c.max_positions, H)),
         "norm.weight": ckpt.take("ln_f.weight", (H,)), "norm.bias": ckpt.take("ln_f.bias", (H,))}
    for i in range(c.num_layers):
        p, o = f"h.{i}.", f"layers.{i}."
        # GPT-2 stores Conv1D weights as (in, out); nn.Linear wants (out, in).
        s[o + "attn_norm.weight"] = ckpt.take(p + "ln_1.weight", (H,))
        s[o + "attn_norm.bias"] = ckpt.take(p + "ln_1.bias", (H,))
        s[o + "attn.qkv.weight"] = ckpt.take(p + "attn.c_attn.weight", (H, 3 * H)).t()
        s[o + "attn.qkv.bias"] = ckpt.take(p + "attn.c_attn.bias", (3 * H,))
        s[o + "attn.out.weight"] = ckpt.take(p + "attn.c_proj.weight", (H, H)).t()
        s[o + "attn.out.bias"] = ckpt.take(p + "attn.c_proj.bias", (H,))
        s[o + "mlp_norm.weight"] = ckpt.take(p + "ln_2.weight", (H,))
        s[o + "mlp_norm.bias"] = ckpt.take(p + "ln_2.bias", (H,))
        s[o + "mlp.up.weight"] = ckpt.take(p + "mlp.c_fc.weight", (H, I)).t()
        s[o + "mlp.up.bias"] = ckpt.take(p + "mlp.c_fc.bias", (I,))
        s[o + "mlp.down.weight"] = ckpt.take(p + "mlp.c_proj.weight", (I, H)).t()
        s[o + "mlp.down.bias"] = ckpt.take(p + "mlp.c_proj.bias", (H,))
    return s


def _llama_state(c: ModelConfig, ckpt: _Checkpoint) -> dict[str, torch.Tensor]:
    H, I, D = c.hidden_size, c.intermediate_size, c.head_dim
    q, kv = c.num_heads * D, c.num_kv_heads * D
    s = {"embed.weight": ckpt.take("embed_tokens.weight", (c.vocab_size, H)),
         "norm.weight": ckpt.take("norm.weight", (H,))}
    for i in range(c.num_layers):
        p, o = f"layers.{i}.", f"layers.{i}."
        a = p + "self_attn."
        s[o + "attn_norm.weight"] = ckpt.take(p + "input_layernorm.weight", (H,))
        s[o + "attn.qkv.weight"] = torch.cat([ckpt.take(a + "q_proj.weight", (q, H)),
                                              ckpt.take(a + "k_proj.weight", (kv, H)),
                                              ckpt.take(a + "v_proj.weight", (kv, H))])
        if c.attention_bias:
            s[o + "attn.qkv.bias"] = torch.cat([ckpt.take(a + "q_proj.bias", (q,)),
                                                ckpt.take(a + "k_proj.bias", (kv,)),
                                                ckpt.take(a + "v_proj.bias", (kv,))])
        s[o + "attn.out.weight"] = ckpt.take(a + "o_proj.weight", (H, q))
        s[o + "mlp_norm.weight"] = ckpt.take(p + "post_attention_layernorm.weight", (H,))
        s[o + "mlp.up.weight"] = torch.cat([ckpt.take(p + "mlp.gate_proj.weight", (I, H)),
                                            ckpt.take(p + "mlp.up_proj.weight", (I, H))])
        s[o + "mlp.down.weight"] = ckpt.take(p + "mlp.down_proj.weight", (H, I))
    return s


def load_state(model: Transformer, tensors: dict[str, torch.Tensor]) -> None:
    """Map checkpoint tensors onto ``model`` (strict: every weight must be found)."""
    c = model.config
    if c.arch == "gpt2":
        prefix = "transformer." if any(k.startswith("transformer.") for k in tensors) else ""
        state = _gpt2_state(c, _Checkpoint(tensors, prefix))
        head = _Checkpoint(tensors, "")
    else:
        state = _llama_state(c, _Checkpoint(tensors, "model."))
        head = _Checkpoint(tensors, "")
    if not c.tie_word_embeddings:
        state["lm_head.weight"] = head.take("lm_head.weight", (c.vocab_size, c.hidden_size))
    dtype = model.dtype
    state = {k: v.to(dtype) for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (m == "lm_head.weight" and c.tie_word_embeddings)]
    if missing or unexpected:
        raise CheckpointError(f"weights not mapped: missing={missing} unexpected={unexpected}")


def _eos_ids(folder: Path, config: ModelConfig) -> list[int]:
    gen = folder / "generation_config.json"
    ids = config.eos_token_ids
    if gen.exists():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        if eos is not None:
            ids = list(eos) if isinstance(eos, list) else [eos]
    return ids


def load_model(path: str | Path | None = None, dtype: torch.dtype | str = torch.float32) -> Transformer:
    """A ready-to-run model (eval mode, tokenizer attached) from a local HF folder.

    With no path, loads the small code model shipped inside the package.
    """
    folder = Path(path) if path is not None else DEFAULT_MODEL_DIR
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder not found: {folder}")
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    config = ModelConfig.from_file(folder)
    with torch.device("meta"):
        model = Transformer(config)
    model = model.to_empty(device="cpu").to(dtype)
    if config.arch == "llama":  # buffers are not in the checkpoint: recompute after to_empty
        from .transformer import rope_tables

        model.rope_cos, model.rope_sin = rope_tables(config)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed.weight
    load_state(model, read_safetensors(folder))
    eos = _eos_ids(folder, config)
    tok_file = folder / "tokenizer.json"
    model.tokenizer = Tokenizer.from_file(tok_file, eos) if tok_file.exists() else Tokenizer.bytes(eos)
    model.source = str(folder)
    return model.eval().requires_grad_(False)
