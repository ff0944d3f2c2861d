"""The attention shapes the memory calculator sizes: published presets, their aliases, and any config.json.

A shape comes from :data:`PRESETS` (published configs; :data:`ALIASES` adds
the names used elsewhere in this project, e.g. ``gpt2-small``), from a Hugging
Face ``config.json`` (read by the model's own reader, ``model/hf_config.py``)
or from a GGUF file's metadata.  Torch-free, like ``memory.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from .checks import is_int
from .model.hf_config import attention_geometry, config_file, read_json_object


@dataclass(frozen=True)
class ModelShape:
    """The attention geometry that determines KV-cache size."""

    name: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    max_positions: int | None
    # multi-head latent attention (DeepSeek): what is cached is the latent, not K/V per head
    kv_lora_rank: int | None = None
    qk_rope_head_dim: int | None = None
    qk_nope_head_dim: int | None = None
    v_head_dim: int | None = None
    # the elements of the weight matrices (projections, MLP, embedding, untied head), when a config.json gave them
    matrix_elements: int | None = None

    def __post_init__(self) -> None:
        for attr in ("num_layers", "num_heads", "num_kv_heads", "head_dim", "hidden_size"):
            value = getattr(self, attr)
            if not is_int(value) or value <= 0:
                raise ValueError(f"ModelShape {self.name!r}: {attr} must be a positive int, got {value!r}")
        if self.max_positions is not None and (not is_int(self.max_positions) or self.max_positions <= 0):
            raise ValueError(
                f"ModelShape {self.name!r}: max_positions must be a positive int or None, "
                f"got {self.max_positions!r}"
            )
        if self.num_heads % self.num_kv_heads != 0:
            raise ValueError(
                f"ModelShape {self.name!r}: num_heads ({self.num_heads}) must be a multiple of "
                f"num_kv_heads ({self.num_kv_heads})"
            )
        mla = (self.kv_lora_rank, self.qk_rope_head_dim, self.qk_nope_head_dim, self.v_head_dim)
        if any(v is not None for v in mla) and not all(is_int(v) and v > 0 for v in mla):
            raise ValueError(f"ModelShape {self.name!r}: latent attention needs kv_lora_rank, qk_rope_head_dim, "
                             f"qk_nope_head_dim and v_head_dim, all positive ints; got {mla}")

    @property
    def is_latent(self) -> bool:
        return self.kv_lora_rank is not None

    @property
    def latent_dim(self) -> int | None:
        """MLA: values cached per token and layer, ``kv_lora_rank + qk_rope_head_dim`` (c_kv and k_pe)."""
        return self.kv_lora_rank + self.qk_rope_head_dim if self.is_latent else None

    @property
    def kv_dim(self) -> int:
        """Width of K (or V) per token per layer: ``num_kv_heads * head_dim``."""
        return self.num_kv_heads * self.head_dim

    @property
    def elements_per_token(self) -> int:
        """Cached elements per token over all layers (one sequence): K+V, or MLA's latent."""
        return self.num_layers * (self.latent_dim if self.is_latent else 2 * self.kv_dim)

    @property
    def expanded_elements_per_token(self) -> int:
        """MLA: what caching the up-projected per-head K (nope + rope) and V would take; otherwise the same."""
        if not self.is_latent:
            return self.elements_per_token
        return self.num_layers * self.num_heads * (self.qk_nope_head_dim + self.qk_rope_head_dim + self.v_head_dim)


def _preset(name, layers, heads, kv_heads, head_dim, hidden, ctx) -> ModelShape:
    return ModelShape(name, layers, heads, kv_heads, head_dim, hidden, ctx)


def _mla_preset(name, layers, heads, hidden, ctx, rank=512, rope=64, nope=128, v=128) -> ModelShape:
    return ModelShape(name, layers, heads, heads, nope + rope, hidden, ctx, rank, rope, nope, v)


# Published configs (Hugging Face config.json / papers).
PRESETS: dict[str, ModelShape] = {
    s.name: s
    for s in (
        # GPT-2 family (openai-community/gpt2*): head_dim 64, 1024 positions.
        _preset("gpt2", 12, 12, 12, 64, 768, 1024),
        _preset("gpt2-medium", 24, 16, 16, 64, 1024, 1024),
        _preset("gpt2-large", 36, 20, 20, 64, 1280, 1024),
        _preset("gpt2-xl", 48, 25, 25, 64, 1600, 1024),
        # GPT-3 175B (Brown et al. 2020, Table 2.1): d_head 128, n_ctx 2048.
        _preset("gpt3-175b", 96, 96, 96, 128, 12288, 2048),
        # Llama 2 (meta-llama/Llama-2-*-hf): 4096 positions; 70B uses GQA.
        _preset("llama-2-7b", 32, 32, 32, 128, 4096, 4096),
        _preset("llama-2-13b", 40, 40, 40, 128, 5120, 4096),
        _preset("llama-2-70b", 80, 64, 8, 128, 8192, 4096),
        # Llama 3 (meta-llama/Meta-Llama-3-*): GQA with 8 KV heads, 8192 positions.
        _preset("llama-3-8b", 32, 32, 8, 128, 4096, 8192),
        _preset("llama-3-70b", 80, 64, 8, 128, 8192, 8192),
        # Mistral-7B-v0.1: GQA 8 KV heads; max_position_embeddings 32768
        # (sliding window 4096 is not modelled here).
        _preset("mistral-7b", 32, 32, 8, 128, 4096, 32768),
        # Qwen/Qwen2.5-0.5B: 14 query heads, 2 KV heads, head_dim 896/14 = 64.
        _preset("qwen2.5-0.5b", 24, 14, 2, 64, 896, 32768),
        # HuggingFaceTB/SmolLM2-135M-Instruct (kvcache pull smollm2-135m): 9 query heads, 3 KV heads.
        _preset("smollm2-135m", 30, 9, 3, 64, 576, 8192),
        # DeepSeek (deepseek-ai/DeepSeek-V2, -V2-Lite, -V3): multi-head latent attention, kv_lora_rank 512,
        # rope 64, nope 128, v 128; 163,840 positions (YaRN).
        _mla_preset("deepseek-v2", 60, 128, 5120, 163840),
        _mla_preset("deepseek-v2-lite", 27, 16, 2048, 163840),
        _mla_preset("deepseek-v3", 61, 128, 7168, 163840),
    )
}


# Other names for presets: the rest of the project (``--random gpt2-small``, the
# benchmarks) calls the 124 M GPT-2 "gpt2-small", after the paper's model sizes.
ALIASES: dict[str, str] = {"gpt2-small": "gpt2"}


def shape_from_config(config: Mapping[str, Any] | str | Path, name: str | None = None) -> ModelShape:
    """Build a :class:`ModelShape` from a Hugging Face ``config.json``.

    ``config`` is the parsed dict, a path to the JSON file, or a path to a
    folder containing ``config.json``.  The keys are read by the model's own
    reader (``model/hf_config.py``): GPT-2's (``n_layer``, ``n_head``,
    ``n_embd``, ``n_positions``), the Llama family's (``num_hidden_layers``,
    ``num_attention_heads``, ``num_key_value_heads`` [default: the heads],
    ``hidden_size``, ``head_dim`` [default: hidden/heads],
    ``max_position_embeddings``), DeepSeek's latent widths, and a few other
    families' names.  Raises ``ValueError`` naming a missing or bad key.
    """
    if isinstance(config, (str, Path)):
        path = config_file(config)
        data, where = read_json_object(path), str(config)
        default_name = path.parent.name if path.name == "config.json" else path.stem
    elif isinstance(config, Mapping):
        data, default_name, where = dict(config), None, "config"
    else:
        raise TypeError(f"config must be a dict or a path, got {type(config).__name__}")

    # Multimodal wrappers (e.g. Llava) keep the language model under text_config.
    if (
        "text_config" in data
        and isinstance(data["text_config"], Mapping)
        and not any(k in data for k in ("num_hidden_layers", "n_layer"))
    ):
        data = {**data, **data["text_config"]}
    try:
        g = attention_geometry(data)
    except KeyError as exc:
        raise ValueError(f"{where}: missing required key {exc.args[0]!r} "
                         f"(have: {', '.join(sorted(data)) or 'nothing'})") from None
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    if name is None:
        name = data.get("_name_or_path") or default_name or data.get("model_type") or "custom"
    return ModelShape(name=str(name), num_layers=g.num_layers, num_heads=g.num_heads, num_kv_heads=g.num_kv_heads,
                      head_dim=g.head_dim, hidden_size=g.hidden_size, max_positions=g.max_positions, **g.latent,
                      matrix_elements=None if g.latent else matrix_elements(data, g))


def matrix_elements(data: Mapping[str, Any], g) -> int | None:
    """Weight-matrix elements of a dense GPT-2 or Llama-family config (None for mixtures of experts, or when the
    config lacks the MLP width or vocabulary): what a weight format's bytes per element multiply."""
    if any(k in data for k in ("num_local_experts", "num_experts", "n_routed_experts")):
        return None
    gpt2 = "n_embd" in data
    hidden, vocab = g.hidden_size, data.get("vocab_size")
    inner = data.get("n_inner") or 4 * hidden if gpt2 else data.get("intermediate_size")
    if not isinstance(vocab, int) or not isinstance(inner, int):
        return None
    q, kv = g.num_heads * g.head_dim, g.num_kv_heads * g.head_dim
    per_layer = hidden * (q + 2 * kv) + q * hidden + (2 if gpt2 else 3) * hidden * inner
    tied = data.get("tie_word_embeddings", gpt2)
    return g.num_layers * per_layer + vocab * hidden * (1 if tied else 2)


def resolve_model(model: str | Path | ModelShape | Mapping[str, Any]) -> ModelShape:
    """Turn a preset name or alias (case-insensitive), config path/folder, config dict
    or :class:`ModelShape` into a :class:`ModelShape`."""
    if isinstance(model, ModelShape):
        return model
    if isinstance(model, Mapping):
        return shape_from_config(model)
    if isinstance(model, Path):
        return shape_from_config(model)
    if isinstance(model, str):
        key = model.strip().lower()
        key = ALIASES.get(key, key)
        if key in PRESETS:
            return PRESETS[key]
        path = Path(model).expanduser()
        if path.exists():
            return shape_from_config(_config_source(path))
        raise ValueError(
            f"unknown model {model!r}: not a preset and no such file or folder. "
            f"Presets: {', '.join(PRESETS)} (aliases: {alias_list()})"
        )
    raise TypeError(f"model must be a preset name, path, dict or ModelShape, got {type(model).__name__}")


def _config_source(path: Path) -> Path | dict[str, Any]:
    """A config.json path, or for a GGUF file (or a folder holding only one) the config it describes."""
    from .model.gguf import find_gguf, is_gguf, read_config

    if path.is_dir() and not (path / "config.json").exists():
        path = find_gguf(path) or path
    return read_config(path) if is_gguf(path) else path


def alias_list() -> str:
    """The aliases, one line: ``alias = preset, ...``."""
    return ", ".join(f"{alias} = {name}" for alias, name in ALIASES.items())
