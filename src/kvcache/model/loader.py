"""Load a local Hugging Face checkpoint folder (or a GGUF file, via ``gguf.py``) into a ``Transformer``.

A folder holds ``config.json``, ``*.safetensors`` (one file or shards) and
optionally ``tokenizer.json``.  Checkpoint names are mapped onto ours and the
Q/K/V (and gate/up) projections are concatenated into the fused weights the
model uses.  Every expected tensor is checked by name and shape, so a wrong
or truncated checkpoint fails with the tensor it is about; and every tensor
of the checkpoint must be used, so a config.json that does not describe the
checkpoint (fewer layers, a bias the config does not declare) fails too,
instead of silently running a different model.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors import safe_open

from ..paths import SHIPPED_MODEL_DIR
from .config import ModelConfig, read_json_object, usable_token_ids
from .gguf import GGMLTensor, cat_rows
from .hf_config import config_file
from .qweight import FORMATS
from .tokenizer import Tokenizer
from .transformer import Transformer
from .weight_formats import KEEP, WeightPlan, describe, plan_for, quantized_weights

DEFAULT_MODEL_DIR = SHIPPED_MODEL_DIR


class CheckpointError(ValueError):
    """A checkpoint is missing a tensor, holds one of the wrong shape, or holds tensors the model does not use."""


# Buffers some checkpoints carry that hold no weights: RoPE's inverse frequencies (recomputed from the
# config) and old GPT-2 causal-mask buffers (h.N.attn.bias / h.N.attn.masked_bias; not c_attn.bias).
HARMLESS = re.compile(r"(^|\.)rotary_emb\.inv_freq$|(^|\.)h\.\d+\.attn\.(bias|masked_bias)$")
LAYER_INDEX = re.compile(r"(?:^|\.)(?:h|layers)\.(\d+)\.")


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

    def __init__(self, tensors: dict[str, torch.Tensor], prefix: str, used: set[str] | None = None):
        self.tensors, self.prefix = tensors, prefix
        self.used = used if used is not None else set()  # names taken, shared between views

    def has(self, name: str) -> bool:
        return self.prefix + name in self.tensors or name in self.tensors

    def take(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        full = self.prefix + name if self.prefix + name in self.tensors else name
        if full not in self.tensors:
            raise CheckpointError(f"checkpoint is missing tensor {self.prefix + name!r}")
        t = self.tensors[full]
        if tuple(t.shape) != shape:
            raise CheckpointError(f"checkpoint tensor {full!r} has shape {tuple(t.shape)}, expected {shape}")
        self.used.add(full)
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
        s[o + "attn.qkv.weight"] = cat_rows([ckpt.take(a + "q_proj.weight", (q, H)),
                                              ckpt.take(a + "k_proj.weight", (kv, H)),
                                              ckpt.take(a + "v_proj.weight", (kv, H))])
        if c.attention_bias:
            s[o + "attn.qkv.bias"] = torch.cat([ckpt.take(a + "q_proj.bias", (q,)),
                                                ckpt.take(a + "k_proj.bias", (kv,)),
                                                ckpt.take(a + "v_proj.bias", (kv,))])
        s[o + "attn.out.weight"] = ckpt.take(a + "o_proj.weight", (H, q))
        if c.attention_out_bias:
            s[o + "attn.out.bias"] = ckpt.take(a + "o_proj.bias", (H,))
        s[o + "mlp_norm.weight"] = ckpt.take(p + "post_attention_layernorm.weight", (H,))
        s[o + "mlp.up.weight"] = cat_rows([ckpt.take(p + "mlp.gate_proj.weight", (I, H)),
                                            ckpt.take(p + "mlp.up_proj.weight", (I, H))])
        s[o + "mlp.down.weight"] = ckpt.take(p + "mlp.down_proj.weight", (H, I))
        if c.mlp_bias:
            s[o + "mlp.up.bias"] = torch.cat([ckpt.take(p + "mlp.gate_proj.bias", (I,)),
                                              ckpt.take(p + "mlp.up_proj.bias", (I,))])
            s[o + "mlp.down.bias"] = ckpt.take(p + "mlp.down_proj.bias", (H,))
    return s


def _check_all_used(c: ModelConfig, tensors: dict[str, torch.Tensor], used: set[str]) -> None:
    """Refuse tensors nothing reads: they mean config.json and the checkpoint disagree."""
    leftover = sorted(n for n in tensors if n not in used and not HARMLESS.search(n))
    if not leftover:
        return
    shown = ", ".join(repr(n) for n in leftover[:8]) + (f" (+{len(leftover) - 8} more)" if len(leftover) > 8 else "")
    layers = [int(m.group(1)) for n in leftover if (m := LAYER_INDEX.search(n))]
    hint = ""
    if layers and max(layers) >= c.num_layers:
        hint = f"; the checkpoint has {max(layers) + 1} layers but config.json has num_layers={c.num_layers}"
    raise CheckpointError(f"checkpoint has {len(leftover)} tensor(s) the model does not use: {shown}{hint}")


def checkpoint_state(c: ModelConfig, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors under the model's names (strict: every weight found, every tensor used)."""
    head = _Checkpoint(tensors, "")
    if c.arch == "gpt2":
        prefix = "transformer." if any(k.startswith("transformer.") for k in tensors) else ""
        state = _gpt2_state(c, _Checkpoint(tensors, prefix, head.used))
    elif c.mla is not None:
        from . import deepseek

        state = deepseek.load_state(c, _Checkpoint(tensors, "model.", head.used).take)
    else:
        state = _llama_state(c, _Checkpoint(tensors, "model.", head.used))
    if not c.tie_word_embeddings:
        state["lm_head.weight"] = head.take("lm_head.weight", (c.vocab_size, c.hidden_size))
    elif head.has("lm_head.weight"):  # a tied head saved anyway: harmless only if it is the embedding
        if not torch.equal(_float(head.take("lm_head.weight", (c.vocab_size, c.hidden_size))),
                           _float(state["embed.weight"])):
            raise CheckpointError("config.json ties the LM head to the embeddings (tie_word_embeddings) but "
                                  "the checkpoint's 'lm_head.weight' differs from the embedding matrix")
    _check_all_used(c, tensors, head.used)
    return state


def _float(t: torch.Tensor | GGMLTensor) -> torch.Tensor:
    return t.dequantize() if isinstance(t, GGMLTensor) else t


def load_state(model: Transformer, tensors: dict[str, torch.Tensor], state: dict | None = None) -> None:
    """Map checkpoint tensors (or the ``state`` already mapped) onto ``model``'s float weights."""
    c = model.config
    state = checkpoint_state(c, tensors) if state is None else state
    dtype = model.dtype
    fp32 = {k for k in state if k.endswith(("mlp.router", "mlp.router_bias"))}  # the MoE router stays float32
    state = {k: _float(v).to(torch.float32 if k in fp32 else dtype) for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (m == "lm_head.weight" and c.tie_word_embeddings)]
    if missing or unexpected:
        raise CheckpointError(f"weights not mapped: missing={missing} unexpected={unexpected}")


def _eos_ids(folder: Path, config: ModelConfig) -> list[int]:
    gen = folder / "generation_config.json"
    ids = config.eos_token_ids
    if gen.exists():
        eos = usable_token_ids(read_json_object(gen).get("eos_token_id"), config.vocab_size, "eos_token_id", str(gen))
        if eos is not None:
            ids = list(eos) if isinstance(eos, list) else [eos]
            if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < config.vocab_size for i in ids):
                raise ValueError(f"{gen}: eos_token_id = {eos!r} must be a token id or a list of token ids in "
                                 f"[0, vocab_size={config.vocab_size})")
    return ids


def load_model(path: str | Path | None = None, dtype: torch.dtype | str = torch.float32,
               pack: bool = True, float_activations: bool = False) -> Transformer:
    """A ready-to-run model (eval mode, tokenizer attached) from a local HF folder or a GGUF file.

    ``path``: a Hugging Face folder (config.json + safetensors), a ``.gguf`` file
    (or a folder holding one), or a model name (``kvcache.hub``: pulled on first use).
    With no path, loads the small code model shipped inside the package.
    ``dtype``: a torch dtype or its name to compute in; a weight format (``"Q8_0"``, ``"Q4_0"``, ``"Q4_1"``,
    ``"F16"``: every matrix held in it, float32 activations; weight_formats.py); or ``"auto"``: the file's own
    (a GGUF's quantized and F16 matrices as stored, a float16 folder as F16, bfloat16 only where the CPU has
    native bfloat16); ``model.load_note`` says which and why.
    ``float_activations``: quantized matrices multiply float32 activations (equal to the dequantized model to
    rounding) instead of the integer kernel's 8-bit ones.
    ``pack`` keeps a oneDNN-blocked copy of every float32 linear weight:
    faster decode, at twice the weight memory; ``pack=False`` keeps only the plain weights.
    """
    auto = isinstance(dtype, str) and dtype.strip().lower() == "auto"
    plan = WeightPlan(KEEP) if auto else plan_for(dtype)
    compute = torch.float32 if plan is not None else model_dtype(dtype)
    if not isinstance(pack, bool):
        raise TypeError(f"pack must be True or False, got {pack!r}")
    source = resolve_source(path)
    if plan is not None and source.is_dir():
        from .hub import gguf_of

        source = gguf_of(source) or source  # a pulled model: its GGUF holds the formats to keep
    if source.suffix == ".gguf" or source.is_file():
        from .gguf import read_gguf

        ckpt = read_gguf(source, keep=plan.gguf_keep() if plan else frozenset())
        try:
            config = ModelConfig.from_hf(ckpt.config)
        except ValueError as exc:
            raise ValueError(f"{source}: {exc}") from None
        tokenizer = Tokenizer.from_backend(ckpt.tokenizer, config.eos_token_ids, ckpt.tokenizer_config)
        compute, note = auto_dtype(gguf_format(ckpt.tensor_types)) if auto else (compute, "as asked")
        tensors = ckpt.tensors
    else:
        config = ModelConfig.from_file(source)
        if auto:
            stored = stored_format(source)
            compute, note = auto_dtype(stored)
            plan = WeightPlan("F16") if stored == "float16" else None
        else:
            note = "as asked"
        tensors = read_safetensors(source)
        tokenizer = Tokenizer.from_folder(source, _eos_ids(source, config))
    model, kept_float = _build(config, compute, tensors, plan, float_activations)
    model.tokenizer = tokenizer
    model.source = str(source)
    quantized = any(fmt in FORMATS for fmt in model.weight_formats())
    activations = " (float32 activations)" if float_activations else (
        ", float32 activations, 8-bit in the quantized matmuls")
    model.load_note = (f"weights {describe(model, kept_float)} ({note}){activations}" if quantized else
                       f"{str(compute).removeprefix('torch.')} ({note})")
    model = model.eval().requires_grad_(False)
    if pack:
        model.pack_weights()
    return model


# the dtypes a model computes in, by name (and short name)
MODEL_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
                "float64": torch.float64}
DTYPE_ALIASES = {"fp32": "float32", "float": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16",
                 "fp64": "float64", "double": "float64"}


def model_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """The torch dtype a ``dtype`` argument names; ValueError / TypeError naming the accepted values."""
    accepted = ", ".join([*MODEL_DTYPES, *DTYPE_ALIASES])
    if isinstance(dtype, str):
        name = DTYPE_ALIASES.get(dtype.strip().lower(), dtype.strip().lower().removeprefix("torch."))
        if name not in MODEL_DTYPES:
            raise ValueError(f"dtype {dtype!r} is not one kvcache computes in (accepted: auto, {accepted}; or a "
                             f"weight format: {', '.join(FORMATS)})")
        return MODEL_DTYPES[name]
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype or one of the names {accepted}; got {type(dtype).__name__}")
    if dtype not in MODEL_DTYPES.values():
        raise ValueError(f"dtype {dtype} is not one kvcache computes in (accepted: "
                         f"{', '.join(f'torch.{n}' for n in MODEL_DTYPES)})")
    return dtype


def native_bf16() -> bool:
    """True when this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX), so a bf16 model is worth keeping."""
    from ..native import cpu_flags

    flags = cpu_flags().split()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def stored_format(folder: Path) -> str:
    """The dtype a Hugging Face folder says its weights are stored in (config.json ``torch_dtype``/``dtype``)."""
    config = read_json_object(config_file(folder))
    stored = config.get("torch_dtype") or config.get("dtype") or "float32"
    return str(stored).removeprefix("torch.")


def gguf_format(tensor_types: dict[str, str]) -> str:
    """A GGUF file's weight format: the GGML type most of its matrices are stored as (F32, BF16, Q8_0, ...)."""
    kinds = [kind for name, kind in tensor_types.items() if "norm" not in name]
    return max(set(kinds), key=kinds.count) if kinds else "F32"


def auto_dtype(stored: str) -> tuple[torch.dtype, str]:
    """What ``dtype="auto"`` computes in for weights stored as ``stored``, and why (for the load message)."""
    if stored in FORMATS:
        return torch.float32, "the file's formats, run natively"
    name = {"F32": "float32", "BF16": "bfloat16"}.get(stored, stored).lower()
    if name == "float32":
        return torch.float32, "the file's dtype"
    if name == "bfloat16":
        if native_bf16():
            return torch.bfloat16, "the file's dtype; this CPU has native bfloat16"
        return torch.float32, "the file is bfloat16, but this CPU has no native bfloat16"
    if name == "float16":
        return torch.float32, "the file's float16 kept as F16 weights"
    return torch.float32, f"the file is {stored}, dequantized to float32 (no native {stored} path)"


def resolve_source(path: str | Path | None) -> Path:
    """The folder or GGUF file ``path`` names: a path, or a model name of ``kvcache.hub`` (pulled if needed)."""
    if path is None:
        return DEFAULT_MODEL_DIR
    if not isinstance(path, (str, Path)):
        raise TypeError(f"a model path must be a str or a Path (a folder, a .gguf file or a model name), "
                        f"got {type(path).__name__}")
    candidate = Path(path)
    if not candidate.exists():
        from . import hub

        if hub.is_model_name(str(path)):
            return hub.ensure(str(path))
        raise FileNotFoundError(f"model not found: {path} (not a folder, a .gguf file or a model name; "
                                f"known names: {', '.join(hub.names())})")
    if candidate.is_dir() and not (candidate / "config.json").exists():
        from .gguf import find_gguf

        gguf_file = find_gguf(candidate)
        if gguf_file is not None:
            return gguf_file
    return candidate


def _build(config: ModelConfig, dtype: torch.dtype, tensors: dict[str, torch.Tensor],
           plan: WeightPlan | None = None, float_activations: bool = False) -> tuple[Transformer, int]:
    """The model with the checkpoint's weights, matrices held as ``plan`` says; and how many it kept float."""
    with torch.device("meta"):
        model = Transformer(config)
    state = checkpoint_state(config, tensors)
    held, kept_float = quantized_weights(model, state, plan or WeightPlan())
    model.hold_quantized(held, float_activations)
    model = model.to_empty(device="cpu").to(dtype)
    if config.arch == "llama":  # buffers are not in the checkpoint: recompute after to_empty
        from .rope import rope_tables

        model.rope_cos, model.rope_sin = rope_tables(config)
    model.watch_weights()  # to_empty/to made plain Parameters: watch them (and re-tie the head)
    load_state(model, tensors, state)
    return model, kept_float
