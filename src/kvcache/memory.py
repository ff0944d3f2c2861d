"""KV-cache memory calculator.

Pure Python (no torch needed): given a model's attention shape, a context
length, a batch size and a storage dtype, compute how much memory the
key/value cache takes.

Formula
-------
::

    KV bytes = 2 (K and V) x layers x kv_heads x head_dim x tokens x batch x bytes/element

``kv_heads`` is the number of *key/value* heads: equal to the number of query
heads for classic multi-head attention (GPT-2, GPT-3, Llama-2-7B/13B), smaller
for grouped-query attention (Llama-2-70B, Llama-3, Mistral, Qwen2.5), which is
exactly why GQA models have much smaller caches.  For MHA,
``kv_heads x head_dim == d_model``.

Worked numbers (fp16, 2 bytes/element)
--------------------------------------
* Llama-2-7B (32 layers, 32 KV heads x 128): 2*32*4096*2 = 524,288 B/token
  (512 KiB); one layer at 2,048 tokens = 2*4096*2048*2 = 33,554,432 B (32 MiB).
* Llama-3-8B (32 layers, 8 KV heads x 128): 2*32*1024*2 = 131,072 B/token
  (128 KiB) -- 4x smaller than Llama-2-7B because of GQA.
* GPT-3 175B (96 layers, 96 heads x head_dim 128, d_model 12288, 2,048 ctx).

Note on the GPT-3 "2*96*96*2048*64 ~ 2.4 G elements ~ 4.8 GB" figure
--------------------------------------------------------------------
The expression ``2 * 96 * 96 * 2048 * 64`` = 2,415,919,104 ~ 2.42 G elements
(x 2 bytes = 4.83 GB = 4.50 GiB in fp16) plugs a head size of **64** into
2 x layers(96) x heads(96) x tokens(2048) x head_dim.  GPT-3 175B's head size
is **128** (96 x 128 = 12288 = d_model); 96 x 64 = 6144 is only *half* of
d_model.  So that figure counts:

* the K/V cache of a hypothetical 96-layer, 96-head model with 64-dim heads
  (GPT-2's head size), or equivalently
* only **one** of K or V for the real GPT-3 (96 * 96 * 2048 * 128 is the same
  2.42 G elements), i.e. half the real cache.

The real full-width GPT-3 175B cache for one 2,048-token sequence is::

    2 * 96 layers * 12288 (= 96 heads * 128) * 2048 tokens = 4,831,838,208 elements
    ~ 4.83 G elements  ->  9,663,676,416 B ~ 9.66 GB = 9.00 GiB in fp16

(4.5 MiB per token).  Note the coincidence that trips people up: the *real*
element count (4.83 G) has the same digits as the *halved* figure's fp16 byte
count (4.83 GB); "4.8 GB" is the real cache only at 1 byte/element
(fp8/int8), not fp16.

Model shapes come from :data:`PRESETS` (published configs; :data:`ALIASES`
adds the names used elsewhere in this project, e.g. ``gpt2-small``) or from a
Hugging Face ``config.json`` via :func:`shape_from_config`.  Every entry point
(:func:`kv_cache_bytes`, :func:`kv_cache_elements`, :func:`memory_report`)
takes any of them: ``kv_cache_bytes("llama-2-7b", tokens=4096)``.  The
calculation ignores sliding-window attention (e.g. Mistral-7B's 4,096-token
window, which lets a rolling cache cap at the window) and any
allocator/paging overhead.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Mapping

from .checks import is_int
from .kv_shapes import ALIASES, PRESETS, ModelShape, alias_list, resolve_model, shape_from_config

__all__ = [
    "ALIASES",
    "DTYPE_BYTES",
    "MemoryReport",
    "ModelShape",
    "PRESETS",
    "alias_list",
    "dtype_bytes",
    "format_bytes",
    "format_presets",
    "format_report",
    "human_bytes",
    "human_bytes_si",
    "kv_cache_bytes",
    "kv_cache_elements",
    "memory_report",
    "preset_rows",
    "resolve_model",
    "shape_from_config",
]


# --------------------------------------------------------------------------- #
# Dtypes
# --------------------------------------------------------------------------- #

DTYPE_BYTES: dict[str, float] = {
    "fp32": 4,
    "float32": 4,
    "fp16": 2,
    "float16": 2,
    "bf16": 2,
    "bfloat16": 2,
    "fp8": 1,
    "int8": 1,
    "int4": 0.5,
}


def _normalize_dtype(name: str) -> str:
    if not isinstance(name, str):
        name = str(name)  # e.g. torch.float16 -> "torch.float16"
    key = name.strip().lower()
    if key.startswith("torch."):
        key = key[len("torch.") :]
    return key


def dtype_bytes(name: str) -> float:
    """Bytes per element for a dtype name (``int4`` -> 0.5)."""
    key = _normalize_dtype(name)
    try:
        return DTYPE_BYTES[key]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; valid dtypes: {', '.join(DTYPE_BYTES)}") from None


# --------------------------------------------------------------------------- #
# Core arithmetic
# --------------------------------------------------------------------------- #


def _check_count(value: Any, what: str) -> int:
    if not is_int(value) or value < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    return int(value)


def _bytes_for(elements: int, per_element: float) -> int:
    # Exact arithmetic (no float rounding for huge counts); round sub-byte up.
    return math.ceil(Fraction(elements) * Fraction(per_element))


def _tokens_for(shape: ModelShape, tokens: int | None) -> int:
    """``tokens``, defaulting to the model's max positions."""
    if tokens is None:
        if shape.max_positions is None:
            raise ValueError(f"model {shape.name!r} has no max positions; pass tokens explicitly")
        return shape.max_positions
    return _check_count(tokens, "tokens")


def kv_cache_elements(
    shape: ModelShape | str | Path | Mapping[str, Any], tokens: int | None = None, batch: int = 1
) -> int:
    """Total K+V element count: 2 * layers * kv_heads * head_dim * tokens * batch.

    ``shape``: a :class:`ModelShape`, a preset name or alias, a config.json
    path/folder or a config dict.  ``tokens`` defaults to the model's max positions.
    """
    shape = resolve_model(shape)
    tokens = _tokens_for(shape, tokens)
    _check_count(batch, "batch")
    return shape.elements_per_token * tokens * batch


def kv_cache_bytes(
    shape: ModelShape | str | Path | Mapping[str, Any], tokens: int | None = None, batch: int = 1,
    dtype: str = "fp16",
) -> int:
    """KV-cache size in bytes (int; sub-byte dtypes are rounded up to whole bytes).

    ``kv_cache_bytes("llama-2-7b", tokens=4096)``; ``shape`` is anything
    :func:`kv_cache_elements` takes.
    """
    per = dtype_bytes(dtype)
    return _bytes_for(kv_cache_elements(shape, tokens, batch), per)


# --------------------------------------------------------------------------- #
# Report
# --------------------------------------------------------------------------- #


@dataclass
class MemoryReport:
    model: str
    dtype: str
    tokens: int
    batch: int
    bytes_per_token: int  # all layers, one token, one sequence
    bytes_per_layer: int  # one layer, `tokens` tokens, one sequence
    bytes_per_sequence: int  # all layers, `tokens` tokens, one sequence
    total_bytes: int  # bytes_per_sequence x batch
    elements: int  # total K+V element count
    bytes_per_element: float = 2
    shape: ModelShape | None = field(default=None, repr=False)
    expanded_bytes_per_token: int | None = None  # MLA: caching the up-projected per-head K/V instead

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = asdict(self.shape) if self.shape is not None else None
        d["total_human"] = format_bytes(self.total_bytes)
        return d


def quantized_bytes_per_element(dtype: str, group_size: int) -> Fraction:
    """kvcache's int8/int4 caches: the codes plus a float16 scale and offset per group of ``group_size`` values."""
    bits = {"int8": 8, "int4": 4}.get(_normalize_dtype(dtype))
    if bits is None:
        raise ValueError(f"--group-size applies to int8/int4 caches, not {dtype!r}")
    return Fraction(bits, 8) + Fraction(4, _check_count(group_size, "group size"))


def memory_report(
    model: str | Path | ModelShape | Mapping[str, Any],
    tokens: int | None = None,
    batch: int = 1,
    dtype: str = "fp16",
    group_size: int | None = None,
    residual: int = 0,
    sinks: int = 0,
    full_dtype: str = "fp16",
) -> MemoryReport:
    """KV-cache memory for ``model`` at ``tokens`` context (default: the model's
    max positions) and ``batch`` sequences stored as ``dtype``.

    With ``group_size`` (int8/int4), sizes are those of kvcache's quantized cache: codes plus float16 scales and
    offsets, the first ``sinks`` and the last ``residual`` tokens (plus the group still being filled) kept in
    ``full_dtype``: what the cache holds when the next token arrives.
    """
    shape = resolve_model(model)
    tokens = _tokens_for(shape, tokens)
    _check_count(batch, "batch")
    elements = kv_cache_elements(shape, tokens, batch)
    if group_size is not None:
        return _quantized_report(shape, tokens, batch, dtype, group_size, residual, sinks, full_dtype, elements)
    per = dtype_bytes(dtype)
    return MemoryReport(
        model=shape.name,
        dtype=_normalize_dtype(dtype),
        tokens=tokens,
        batch=batch,
        bytes_per_token=_bytes_for(shape.elements_per_token, per),
        bytes_per_layer=_bytes_for(shape.elements_per_token // shape.num_layers * tokens, per),
        bytes_per_sequence=_bytes_for(shape.elements_per_token * tokens, per),
        total_bytes=_bytes_for(elements, per),
        elements=elements,
        bytes_per_element=per,
        shape=shape,
        expanded_bytes_per_token=_bytes_for(shape.expanded_elements_per_token, per) if shape.is_latent else None,
    )


def _quantized_report(shape, tokens, batch, dtype, group_size, residual, sinks, full_dtype, elements):
    per = quantized_bytes_per_element(dtype, group_size)
    for value, what in ((residual, "residual"), (sinks, "sinks")):
        if not is_int(value) or value < 0:
            raise ValueError(f"{what} must be an integer >= 0, got {value!r}")
    full = Fraction(dtype_bytes(full_dtype))
    kept_full = tokens - max(0, tokens - sinks - residual) // group_size * group_size  # as caches/quantized.py
    sequence = math.ceil(shape.elements_per_token * ((tokens - kept_full) * per + kept_full * full))
    label = f"{_normalize_dtype(dtype)}, group {group_size}, residual {residual}, sinks {sinks} ({full_dtype})"
    return MemoryReport(model=shape.name, dtype=label, tokens=tokens, batch=batch,
                        bytes_per_token=math.ceil(shape.elements_per_token * per),
                        bytes_per_layer=math.ceil(sequence / shape.num_layers), bytes_per_sequence=sequence,
                        total_bytes=sequence * batch, elements=elements, bytes_per_element=float(per), shape=shape)


# --------------------------------------------------------------------------- #
# Formatting
# --------------------------------------------------------------------------- #


def _scaled(n: float, base: int, units: tuple[str, ...]) -> str:
    sign = "-" if n < 0 else ""
    value = abs(n)
    if value < base:
        return f"{sign}{value:g} {units[0]}" if value != int(value) else f"{sign}{int(value)} {units[0]}"
    i = 0
    while value >= base and i < len(units) - 1:
        value /= base
        i += 1
    digits = 2 if value < 10 else 1
    return f"{sign}{value:.{digits}f} {units[i]}"


def human_bytes(n: float) -> str:
    """Binary units: ``512 B``, ``512.0 KiB``, ``4.50 GiB``."""
    return _scaled(n, 1024, ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"))


def human_bytes_si(n: float) -> str:
    """Decimal (SI) units: ``4.83 GB``."""
    return _scaled(n, 1000, ("B", "kB", "MB", "GB", "TB", "PB", "EB"))


def format_bytes(n: float) -> str:
    """Both conventions, e.g. ``4.83 GB / 4.50 GiB`` (just ``512 B`` under 1 kB)."""
    if abs(n) < 1000:
        return human_bytes(n)
    return f"{human_bytes_si(n)} / {human_bytes(n)}"


def _bpe(x: float) -> str:
    return f"{x:g} byte" + ("" if x == 1 else "s")


def format_report(report: MemoryReport) -> str:
    """Readable multi-line summary of a :class:`MemoryReport`."""
    lines = [f"KV cache memory: {report.model}"]
    s = report.shape
    if s is not None and s.is_latent:
        lines.append(
            f"  shape        : {s.num_layers} layers x latent {s.latent_dim} (c_kv {s.kv_lora_rank} + k_pe "
            f"{s.qk_rope_head_dim}; MLA, {s.num_heads} heads, hidden {s.hidden_size})"
        )
    elif s is not None:
        attn = "MHA" if s.num_kv_heads == s.num_heads else f"GQA, {s.num_heads} query heads"
        lines.append(
            f"  shape        : {s.num_layers} layers x {s.num_kv_heads} KV heads x head_dim {s.head_dim} "
            f"({attn}; hidden {s.hidden_size})"
        )
    lines += [
        f"  dtype        : {report.dtype} ({_bpe(report.bytes_per_element)}/element)",
        f"  tokens       : {report.tokens:,}",
        f"  batch        : {report.batch:,}",
        f"  per token    : {report.bytes_per_token:>17,} B  ({format_bytes(report.bytes_per_token)})"
        "  all layers, 1 sequence",
        f"  per layer    : {report.bytes_per_layer:>17,} B  ({format_bytes(report.bytes_per_layer)})"
        f"  {report.tokens:,} tokens, 1 sequence",
        f"  per sequence : {report.bytes_per_sequence:>17,} B  ({format_bytes(report.bytes_per_sequence)})",
        f"  total        : {report.total_bytes:>17,} B  ({format_bytes(report.total_bytes)})"
        f"  x batch {report.batch:,}",
        f"  elements     : {report.elements:>17,}  "
        + ("(layers x latent x tokens x batch)" if s is not None and s.is_latent
           else "(2 x K/V x layers x kv_heads x head_dim x tokens x batch)"),
    ]
    if s is not None and s.matrix_elements is not None:
        lines.append(f"  weights      : {format_weight_bytes(s.matrix_elements)} ({s.matrix_elements:,} matrix "
                     "elements; load_model dtype / --dtype)")
    lines.append(f"  in a KV tier : {report.bytes_per_token:>17,} B per token, stored as the pool holds it "
                 "(--kv-disk / --kv-store chunks add a ~2 KB header each)")
    if report.expanded_bytes_per_token is not None:
        e = report.expanded_bytes_per_token
        lines.append(f"  vs expanded  : {e:>17,} B per token if the up-projected K ({s.qk_nope_head_dim} + "
                     f"{s.qk_rope_head_dim}) and V ({s.v_head_dim}) of {s.num_heads} heads were cached: "
                     f"{e / report.bytes_per_token:.1f}x the latent cache")
    return "\n".join(lines)


# bytes per weight element of each weight format kvcache runs (GGUF's: blocks of 32 with fp16 scales)
WEIGHT_FORMAT_BYTES: dict[str, float] = {"fp32": 4, "bf16": 2, "F16": 2, "Q8_0": 34 / 32, "Q4_1": 20 / 32,
                                         "Q4_0": 18 / 32}


def weight_bytes(matrix_elements: int) -> dict[str, int]:
    """The bytes of a model's weight matrices in each weight format (norms and biases not counted)."""
    return {fmt: round(matrix_elements * per) for fmt, per in WEIGHT_FORMAT_BYTES.items()}


def format_weight_bytes(matrix_elements: int | None) -> str:
    if matrix_elements is None:
        return "n/a (needs a dense model's config.json)"
    return ", ".join(f"{fmt} {human_bytes_si(n)}" for fmt, n in weight_bytes(matrix_elements).items())


def format_presets(dtype: str = "fp16") -> str:
    """Table of all presets with per-token (and full-context) cache size."""
    per = dtype_bytes(dtype)
    header = (
        f"{'preset':<14} {'layers':>6} {'heads':>5} {'kv':>3} {'hdim':>4} {'ctx':>6} "
        f"{'bytes/token (' + _normalize_dtype(dtype) + ')':>22} {'per token':>10} {'full ctx, 1 seq':>22}"
    )
    rows = [header, "-" * len(header)]
    for s in PRESETS.values():
        per_tok = _bytes_for(s.elements_per_token, per)
        full = _bytes_for(s.elements_per_token * s.max_positions, per) if s.max_positions else None
        rows.append(
            f"{s.name:<14} {s.num_layers:>6} {s.num_heads:>5} {s.num_kv_heads:>3} {s.head_dim:>4} "
            f"{(s.max_positions or 0):>6} {per_tok:>22,} {human_bytes(per_tok):>10} "
            f"{(format_bytes(full) if full is not None else '-'):>22}"
        )
    return "\n".join(rows)


def preset_rows(dtype: str = "fp16") -> list[dict[str, Any]]:
    """Every preset's shape with its KV bytes per token at ``dtype`` (``kvcache memory --list --json``)."""
    per = dtype_bytes(dtype)
    return [{**asdict(s), "dtype": _normalize_dtype(dtype), "bytes_per_token": _bytes_for(s.elements_per_token, per)}
            for s in PRESETS.values()]
