"""Read a llama.cpp GGUF file as a Hugging Face checkpoint: config, tensors, tokenizer, chat template.

The file is read with the ``gguf`` package (llama.cpp's own reader) and its
tensors are dequantized with ``gguf.quants``.  What comes out is exactly what
a Hugging Face folder holds -- a config.json dict, tensors under HF names, a
``tokenizers`` tokenizer and the tokenizer config with the chat template -- so
the loader has one path for both, and ``save_as_hf`` can write the folder.

llama.cpp's converter permutes the rows of the Q and K projections of Llama
models (it pairs rotary dimensions (2i, 2i+1); HF pairs (i, i + d/2)).  We
undo it exactly as transformers' GGUF loader does (``_unpermute``); Qwen2
GGUFs are not permuted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

GGUF_MAGIC = b"GGUF"
SUPPORTED_ARCHITECTURES = ("llama", "qwen2")

# llama.cpp tensor names -> Hugging Face names ({i}: the layer)
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}
_LAYER_NAMES = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                "ffn_down": "mlp.down_proj"}


@dataclass(eq=False)
class GGMLTensor:
    """A tensor kept in its GGUF encoding: ``raw`` holds one row of blocks per row of the (rows, cols) matrix."""

    raw: np.ndarray
    kind: str  # the GGML type name: Q8_0, Q4_1, F16, ...
    shape: tuple[int, int]

    def dequantize(self) -> torch.Tensor:
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        values = dequantize(self.raw, GGMLQuantizationType[self.kind]).reshape(self.shape)
        return torch.from_numpy(np.array(values, dtype=np.float32))


def cat_rows(parts: list) -> Any:
    """Concatenate matrices along their rows: tensors, or GGML tensors of one type (blocks are per row);
    GGML tensors of different types are widened to float32 first."""
    if all(isinstance(p, GGMLTensor) for p in parts) and len({p.kind for p in parts}) == 1:
        rows = sum(p.shape[0] for p in parts)
        return GGMLTensor(np.concatenate([p.raw for p in parts]), parts[0].kind, (rows, parts[0].shape[1]))
    return torch.cat([p.dequantize() if isinstance(p, GGMLTensor) else p for p in parts])


class GGUFError(ValueError):
    """A file that is not a GGUF, is truncated, or describes something we do not run (named in the message)."""


@dataclass
class GGUFCheckpoint:
    """A GGUF file translated into the parts of a Hugging Face folder."""

    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    tokenizer: Any  # tokenizers.Tokenizer
    tokenizer_config: dict[str, Any] = field(default_factory=dict)
    generation_config: dict[str, Any] = field(default_factory=dict)
    tensor_types: dict[str, str] = field(default_factory=dict)  # HF name -> GGML type it was stored as


def is_gguf(path: str | Path) -> bool:
    """True if ``path`` is a file starting with the GGUF magic bytes."""
    path = Path(path)
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC


def find_gguf(folder: Path) -> Path | None:
    """The single ``*.gguf`` of a folder; None if it has none; an error if it has several."""
    files = sorted(folder.glob("*.gguf"))
    if len(files) > 1:
        names = ", ".join(f.name for f in files)
        raise GGUFError(f"{folder} holds several GGUF files ({names}): name the one to load")
    return files[0] if files else None


def _open(path: Path):
    from gguf import GGUFReader

    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    if not is_gguf(path):
        raise GGUFError(f"{path} is not a GGUF file (it does not start with the bytes 'GGUF')")
    try:
        reader = GGUFReader(str(path))
    except Exception as exc:  # the reader raises ValueError, IndexError, struct errors... on a damaged file
        raise GGUFError(f"cannot read GGUF file {path}: truncated or corrupt ({type(exc).__name__}: {exc})") from None
    size = path.stat().st_size
    for t in reader.tensors:  # a memory map does not notice a file cut inside the tensor data: check the ends
        if t.data_offset + t.n_bytes > size:
            raise GGUFError(f"cannot read GGUF file {path}: truncated or corrupt (tensor {t.name!r} ends at byte "
                            f"{t.data_offset + t.n_bytes:,} of a {size:,}-byte file)")
    return reader


class _Metadata:
    """Typed access to a reader's key/value fields, with errors that name the missing key."""

    def __init__(self, reader, path: Path):
        self.fields, self.path = reader.fields, path

    def get(self, key: str, default: Any = None) -> Any:
        f = self.fields.get(key)
        if f is None:
            return default
        return f.contents()

    def need(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise GGUFError(f"GGUF file {self.path} is missing the metadata key {key!r}")
        return value


def _config(meta: _Metadata, arch: str, has_output: bool, vocab: int) -> dict[str, Any]:
    p = arch + "."
    hidden, heads = int(meta.need(p + "embedding_length")), int(meta.need(p + "attention.head_count"))
    kv_heads = int(meta.get(p + "attention.head_count_kv", heads))
    head_dim = int(meta.get(p + "attention.key_length", hidden // heads))
    rope_dim = int(meta.get(p + "rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise GGUFError(f"partial rotary embeddings (rope.dimension_count={rope_dim}, head_dim={head_dim}) "
                        "are not supported")
    scaling = meta.get(p + "rope.scaling.type", "none")
    if scaling not in ("none", "", None):
        raise GGUFError(f"unsupported rope scaling {scaling!r} in the GGUF metadata (supported: none)")
    bos, eos = meta.get("tokenizer.ggml.bos_token_id"), meta.get("tokenizer.ggml.eos_token_id")
    architectures = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
    config = {
        "architectures": [architectures[arch]], "model_type": arch,
        "vocab_size": int(meta.get(p + "vocab_size", vocab)),
        "hidden_size": hidden, "intermediate_size": int(meta.need(p + "feed_forward_length")),
        "num_hidden_layers": int(meta.need(p + "block_count")), "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "head_dim": head_dim, "hidden_act": "silu",
        "max_position_embeddings": int(meta.need(p + "context_length")),
        "rms_norm_eps": float(meta.need(p + "attention.layer_norm_rms_epsilon")),
        "rope_theta": float(meta.get(p + "rope.freq_base", 10000.0)),
        "tie_word_embeddings": not has_output, "bos_token_id": bos, "eos_token_id": eos, "torch_dtype": "float32",
    }
    if arch == "llama":
        config.update(attention_bias=False, mlp_bias=False)
    else:
        config["use_sliding_window"] = False
    return config


def _hf_name(name: str) -> str:
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _LAYER_NAMES and parts[3] in ("weight", "bias"):
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"
    raise GGUFError(f"GGUF tensor {name!r} has no counterpart in the model (unsupported variant)")


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (transformers' ``_reverse_permute_weights``)."""
    half = w.shape[0] // heads // 2
    return w.reshape(heads, half, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def _dequantize(tensor, path: Path) -> np.ndarray:
    from gguf.quants import dequantize

    kind = tensor.tensor_type.name
    try:
        values = dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError:
        raise GGUFError(f"GGUF tensor {tensor.name!r} is stored as {kind}, a type the gguf package cannot "
                        "dequantize") from None
    except (ValueError, IndexError) as exc:
        raise GGUFError(f"cannot read GGUF tensor {tensor.name!r} ({kind}) of {path}: truncated or corrupt "
                        f"({exc})") from None
    shape = tuple(int(n) for n in reversed(tensor.shape))  # GGUF lists dimensions fastest-first
    if values.size != int(np.prod(shape)):
        raise GGUFError(f"GGUF tensor {tensor.name!r} holds {values.size} values, expected shape {shape}: "
                        "truncated or corrupt")
    return values.reshape(shape)


def _raw_rows(tensor, path: Path) -> np.ndarray:
    """A matrix's encoded bytes, one row of blocks per row (rows, bytes per row), checked against its shape."""
    from gguf import GGML_QUANT_SIZES

    cols, rows = (int(n) for n in tensor.shape)
    block, size = GGML_QUANT_SIZES[tensor.tensor_type]
    data = np.asarray(tensor.data).view(np.uint8)
    if cols % block or data.size != rows * cols // block * size:
        raise GGUFError(f"GGUF tensor {tensor.name!r} of {path} holds {data.size} bytes, not the "
                        f"{rows * cols // block * size} of a ({rows}, {cols}) {tensor.tensor_type.name} matrix")
    return data.reshape(rows, cols // block * size)


def _tokenizer(meta: _Metadata):
    """A byte-level BPE ``tokenizers.Tokenizer`` from the vocabulary, merges and token types in the metadata."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    kind = meta.need("tokenizer.ggml.model")
    if kind != "gpt2":
        raise GGUFError(f"unsupported GGUF tokenizer {kind!r} (supported: 'gpt2', byte-level BPE)")
    tokens = list(meta.need("tokenizer.ggml.tokens"))
    merges = [tuple(m.split(" ", 1)) for m in meta.need("tokenizer.ggml.merges")]
    types = list(meta.get("tokenizer.ggml.token_type", [1] * len(tokens)))
    vocab = {token: i for i, token in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre == "smollm":  # llama.cpp's SMOLLM pre-tokenizer: every digit alone, then GPT-2's regex
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in ("default", "gpt2", "gpt-2"):
        tok.pre_tokenizer = byte_level
    elif pre in ("qwen2", "deepseek-r1-qwen"):
        split = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                              use_regex=False)])
    else:
        raise GGUFError(f"unsupported GGUF pre-tokenizer {pre!r} (supported: smollm, gpt2, qwen2)")
    tok.decoder = decoders.ByteLevel()
    control = [AddedToken(t, special=True, normalized=False) for t, kind in zip(tokens, types) if kind == 3]
    tok.add_special_tokens(control)
    return tok


def _tokenizer_config(meta: _Metadata, tokens: list[str]) -> dict[str, Any]:
    def token(key: str) -> str | None:
        i = meta.get(key)
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": token("tokenizer.ggml.bos_token_id"),
              "eos_token": token("tokenizer.ggml.eos_token_id"), "unk_token": token("tokenizer.ggml.unknown_token_id"),
              "pad_token": token("tokenizer.ggml.padding_token_id"),
              "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
              "clean_up_tokenization_spaces": False}
    template = meta.get("tokenizer.chat_template")
    if template:
        config["chat_template"] = template
    return {k: v for k, v in config.items() if v is not None}


def read_config(path: str | Path) -> dict[str, Any]:
    """The Hugging Face config.json dict a GGUF file describes (metadata only: no tensor is dequantized)."""
    return _header(Path(path))[2]


def _header(path: Path) -> tuple[Any, _Metadata, dict[str, Any]]:
    """The open reader, its metadata and the config.json dict it describes (architecture checked)."""
    reader = _open(path)
    meta = _Metadata(reader, path)
    arch = meta.need("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise GGUFError(f"unsupported GGUF architecture {arch!r} (kvcache reads {', '.join(SUPPORTED_ARCHITECTURES)})")
    has_output = any(t.name == "output.weight" for t in reader.tensors)
    return reader, meta, _config(meta, arch, has_output, len(meta.need("tokenizer.ggml.tokens")))


def read_gguf(path: str | Path, dtype: torch.dtype = torch.float32, progress: bool = False,
              keep: frozenset[str] = frozenset()) -> GGUFCheckpoint:
    """Every tensor dequantized to ``dtype`` under its HF name, plus config, tokenizer and chat template.

    Matrices stored in one of the GGML types in ``keep`` (e.g. ``{"Q8_0", "Q4_1"}``) stay encoded, as
    :class:`GGMLTensor` (Q/K rows still un-permuted), for a model that runs them as they are."""
    from tqdm import tqdm

    path = Path(path)
    reader, meta, config = _header(path)
    arch, tokens = config["model_type"], list(meta.need("tokenizer.ggml.tokens"))
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    tensors, types = {}, {}
    for t in tqdm(reader.tensors, desc="dequantizing", unit="tensor", disable=not progress, leave=False):
        if t.name == "rope_freqs.weight":
            raise GGUFError("GGUF tensor 'rope_freqs.weight' (Llama-3 rope scaling) is not supported")
        name, kind = _hf_name(t.name), t.tensor_type.name
        raw = kind in keep and len(t.shape) == 2
        values = _raw_rows(t, path) if raw else _dequantize(t, path)
        if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            values = _unpermute(values, heads if "q_proj" in name else kv_heads)  # whole rows: raw ones too
        if raw:
            tensors[name] = GGMLTensor(np.ascontiguousarray(values), kind, tuple(int(n) for n in reversed(t.shape)))
        else:
            tensors[name] = torch.from_numpy(np.array(values, dtype=np.float32)).to(dtype)
        types[name] = kind
    eos = config["eos_token_id"]
    generation = {"bos_token_id": config["bos_token_id"], "eos_token_id": eos} if eos is not None else {}
    return GGUFCheckpoint(config, tensors, _tokenizer(meta), _tokenizer_config(meta, tokens), generation, types)


def save_as_hf(checkpoint: GGUFCheckpoint, folder: str | Path) -> Path:
    """Write the checkpoint as a Hugging Face folder that both kvcache and transformers load."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(checkpoint.config, indent=2) + "\n")
    save_file({k: v.contiguous() for k, v in checkpoint.tensors.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    checkpoint.tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(checkpoint.tokenizer_config, indent=2) + "\n")
    if checkpoint.generation_config:
        (folder / "generation_config.json").write_text(json.dumps(checkpoint.generation_config, indent=2) + "\n")
    return folder
