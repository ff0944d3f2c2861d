"""The cache contract, written down, and the registry of cache spec strings.

What the model calls
    ``attend(layer, q, k, v, window=None) -> out``: store ``k``/``v``
    (batch, kv_heads, n, head_dim) as the next ``n`` positions of ``layer`` and
    return causal attention of ``q`` (batch, heads, n, head_dim) over every
    position the cache holds for that layer (the last ``window`` only, for a
    sliding-window model).  Layers are filled in order within a forward pass.
    ``len(cache)`` is the next position: the model's RoPE / learned positions
    start there.

What a caller uses
    ``crop(length)`` rolls back to the first ``length`` positions (speculative
    decoding, chat turns); ``select(batch_indices)`` keeps/reorders/duplicates
    batch rows (beam search); ``reset()`` empties it; ``nbytes`` is the memory
    it holds (payload, scales and any full-precision part), ``used_bytes`` the
    part holding tokens.  ``for_model(model, batch, capacity, **options)``
    builds one shaped for a model.  Every method validates before it changes
    anything: a refused call leaves the cache as it was.

Spec strings (``generate(..., cache="int4:group=32,residual=128")``, ``--kv-cache``)
    ``NAME[:KEY=VALUE[,KEY=VALUE...]]``.  ``NAME`` is a registered cache
    (:data:`REGISTRY`); keys are that cache's options (``Cache.options``);
    values are integers, booleans (``1/0``, ``true/false``, ``yes/no``) or one
    of an option's listed choices.  Unknown names, keys or values raise
    ``ValueError`` listing what is valid.  ``kvcache caches`` prints them all.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch


@dataclass(frozen=True)
class Option:
    """One spec option: its type (int, bool or str), default, meaning and limits."""

    kind: type
    default: Any
    help: str
    choices: tuple[str, ...] = ()
    minimum: int | None = None

    def parse(self, key: str, text: str) -> Any:
        if self.kind is bool:
            lowered = text.lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"option {key}={text!r}: expected a boolean (1/0, true/false, yes/no)")
        if self.kind is int:
            try:
                value = int(text)
            except ValueError:
                raise ValueError(f"option {key}={text!r}: expected an integer") from None
            if self.minimum is not None and value < self.minimum:
                raise ValueError(f"option {key}={value}: must be >= {self.minimum}")
            return value
        if self.choices and text not in self.choices:
            raise ValueError(f"option {key}={text!r}: expected one of {', '.join(self.choices)}")
        return text


class Cache(ABC):
    """The KV cache contract of the single-stream path (``generate``, beam search, chat, eval).

    Subclasses set ``options`` (the spec keys they accept) and ``lossless``
    (True when attention through the cache equals dense attention).
    """

    options: ClassVar[dict[str, Option]] = {}
    lossless: ClassVar[bool] = True

    @classmethod
    @abstractmethod
    def for_model(cls, model, batch: int = 1, capacity: int | None = None, **options) -> Cache: ...

    @property
    @abstractmethod
    def num_layers(self) -> int: ...

    @property
    @abstractmethod
    def batch(self) -> int: ...

    @property
    @abstractmethod
    def num_kv_heads(self) -> int: ...

    @property
    @abstractmethod
    def head_dim(self) -> int: ...

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               window: int | None = None) -> torch.Tensor: ...

    @abstractmethod
    def crop(self, length: int) -> None: ...

    @abstractmethod
    def select(self, batch_indices: Sequence[int] | torch.Tensor) -> None: ...

    @abstractmethod
    def reset(self) -> None: ...

    @property
    @abstractmethod
    def nbytes(self) -> int: ...

    @property
    @abstractmethod
    def used_bytes(self) -> int: ...

    def fits(self, model, batch: int = 1) -> None:
        """Raise ValueError unless this cache is shaped for ``model`` with ``batch`` rows."""
        c = model.config
        want = (batch, c.num_layers, c.cache_kv_heads, c.cache_key_dim)
        have = (self.batch, self.num_layers, self.num_kv_heads, self.head_dim)
        if have != want:
            raise ValueError(f"cache shape (batch {have[0]}, {have[1]} layers, {have[2]} KV heads, head_dim "
                             f"{have[3]}) does not fit this model with batch {batch} ({want[1]} layers, "
                             f"{want[2]} KV heads, head_dim {want[3]})")


# name -> ("module:Class", options fixed by the name).  A new cache type: one file and one line here.
REGISTRY: dict[str, tuple[str, dict[str, Any]]] = {
    "auto": ("kvcache.caches.contiguous:ContiguousKVCache", {}),
    "fp32": ("kvcache.caches.contiguous:ContiguousKVCache", {"dtype": "float32"}),
    "fp64": ("kvcache.caches.contiguous:ContiguousKVCache", {"dtype": "float64"}),
    "fp16": ("kvcache.caches.contiguous:ContiguousKVCache", {"dtype": "float16"}),
    "bf16": ("kvcache.caches.contiguous:ContiguousKVCache", {"dtype": "bfloat16"}),
    "int8": ("kvcache.caches.quantized:QuantizedKVCache", {"bits": 8}),
    "int4": ("kvcache.caches.quantized:QuantizedKVCache", {"bits": 4}),
    "window": ("kvcache.caches.window:WindowKVCache", {}),
    "snapkv": ("kvcache.caches.compressed:CompressedKVCache", {"policy": "snapkv"}),
    "h2o": ("kvcache.caches.compressed:CompressedKVCache", {"policy": "h2o", "kernel": 1}),  # no vote pooling
}

DESCRIPTIONS = {
    "auto": "full precision in the model's dtype (the default; lossless)",
    "fp32": "full precision, float32 (lossless; the model must compute in float32)",
    "fp64": "full precision, float64 (lossless; the model must compute in float64)",
    "fp16": "full precision, float16 (lossless; the model must compute in float16)",
    "bf16": "full precision, bfloat16 (lossless; the model must compute in bfloat16)",
    "int8": "8-bit group-wise quantized keys and values, full-precision residual (lossy)",
    "int4": "4-bit group-wise quantized, two per byte; KIVI per-channel keys by default, rotation optional (lossy)",
    "window": "bounded: the last `size` tokens in a ring buffer plus `sinks` first tokens (StreamingLLM); streams "
              "past the model's context with positions=cache (lossy)",
    "snapkv": "prompt compression: each KV head keeps the `budget` prompt positions its last `window` queries "
              "attend to most (SnapKV); generated tokens appended (lossy)",
    "h2o": "bounded: each KV head keeps `budget` positions, evicting the least attended outside the last `window` "
           "(H2O heavy hitters) (lossy)",
}


def cache_class(name: str) -> type[Cache]:
    target, _ = _entry(name)
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def _entry(name: str) -> tuple[str, dict[str, Any]]:
    if name not in REGISTRY:
        raise ValueError(f"unknown cache {name!r}; registered caches: {', '.join(REGISTRY)}")
    return REGISTRY[name]


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"int4:group=32,residual=128"`` -> ``("int4", {"bits": 4, "group": 32, "residual": 128})``."""
    if not isinstance(spec, str):
        raise TypeError(f"a cache spec must be a string, got {type(spec).__name__}")
    name, _, rest = spec.strip().partition(":")
    _, fixed = _entry(name)
    accepted = cache_class(name).options
    options = dict(fixed)
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, eq, text = item.partition("=")
        key = key.strip()
        if not eq:
            raise ValueError(f"cache spec {spec!r}: {item!r} is not KEY=VALUE")
        if key not in accepted or key in fixed:
            valid = ", ".join(k for k in accepted if k not in fixed) or "none"
            raise ValueError(f"cache spec {spec!r}: unknown option {key!r} for {name!r} (options: {valid})")
        if key in options and key not in fixed:
            raise ValueError(f"cache spec {spec!r}: option {key!r} given twice")
        options[key] = accepted[key].parse(key, text.strip())
    return name, options


def make_cache(spec: str | Cache | None, model, batch: int = 1, capacity: int | None = None) -> Cache:
    """A cache for ``model`` from a spec string (None: ``"auto"``); a ``Cache`` object is checked and returned."""
    if isinstance(spec, Cache):
        spec.fits(model, batch)
        return spec
    name, options = parse_spec("auto" if spec is None else spec)
    return cache_class(name).for_model(model, batch=batch, capacity=capacity, **options)


def describe_caches() -> list[tuple[str, str, dict[str, Option]]]:
    """(name, description, free options) for every registered cache, for ``kvcache caches`` and docs."""
    rows = []
    for name, (_, fixed) in REGISTRY.items():
        free = {k: o for k, o in cache_class(name).options.items() if k not in fixed}
        rows.append((name, DESCRIPTIONS.get(name, ""), free))
    return rows
