"""One declaration per cache type, for both paths, and the spec strings that name them.

A cache type is a :class:`CacheType`: its name, its single-stream ``Cache`` class, its engine
``PagedPool`` class (or the reason the engine does not serve it, which becomes the error), the options
its name fixes, and a description.  A new cache type is one file holding its classes and one
``register`` call (or line in :data:`REGISTRY`); ``generate``, the engine, ``kvcache caches`` and the
contract suites then know it.

Spec strings (``generate(..., cache="int4:group=32,residual=128")``, ``--kv-cache``, ``LLM(kv_cache=...)``)
    ``NAME[:KEY=VALUE[,KEY=VALUE...]]``.  ``NAME`` is a registered cache; keys are its ``Cache.options``;
    values are integers, booleans (``1/0``, ``true/false``, ``yes/no``) or one of an option's listed
    choices.  A spec is parsed once, into a :class:`CacheSpec`; unknown names, keys or values raise
    ``ValueError`` listing what is valid.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

from .base import Cache, Option, PagedPool


@dataclass(frozen=True)
class CacheType:
    """A cache type's declaration.  Classes are given as ``"module:Class"`` (imported on first use) or as
    the class itself."""

    name: str
    cache: str | type[Cache]
    description: str
    pool: str | type[PagedPool] | None = None
    no_pool: str = ""  # why the engine does not serve this type (its error message), when pool is None
    fixed: Mapping[str, Any] = field(default_factory=dict)  # options the name fixes ("int4": bits=4)

    def __post_init__(self) -> None:
        if (self.pool is None) == (not self.no_pool):
            raise ValueError(f"cache type {self.name!r}: give an engine pool class or the reason there is none")

    def cache_class(self) -> type[Cache]:
        return _resolve(self.cache)

    def pool_class(self) -> type[PagedPool]:
        if self.pool is None:
            raise ValueError(f"the engine does not serve {self.name!r} caches: {self.no_pool}")
        return _resolve(self.pool)

    @property
    def free_options(self) -> dict[str, Option]:
        return {k: o for k, o in self.cache_class().options.items() if k not in self.fixed}


@dataclass(frozen=True)
class CacheSpec:
    """A parsed spec: the type's name, every option it sets (fixed by the name, then given), and the keys given
    (in the order given)."""

    name: str
    options: Mapping[str, Any]
    given: tuple[str, ...] = ()

    @classmethod
    def parse(cls, spec: str | CacheSpec | None) -> CacheSpec:
        """``"int4:group=32"`` -> ``CacheSpec("int4", {"bits": 4, "group": 32}, ("group",))``; None is ``"auto"``."""
        if isinstance(spec, CacheSpec):
            return spec
        if spec is None:
            spec = "auto"
        if not isinstance(spec, str):
            raise TypeError(f"a cache spec must be a string, got {type(spec).__name__}")
        name, _, rest = spec.strip().partition(":")
        kind = cache_type(name)
        accepted = kind.cache_class().options
        options, given = dict(kind.fixed), []
        for item in filter(None, (part.strip() for part in rest.split(","))):
            key, eq, text = item.partition("=")
            key = key.strip()
            if not eq:
                raise ValueError(f"cache spec {spec!r}: {item!r} is not KEY=VALUE")
            if key not in accepted or key in kind.fixed:
                valid = ", ".join(kind.free_options) or "none"
                raise ValueError(f"cache spec {spec!r}: unknown option {key!r} for {name!r} (options: {valid})")
            if key in given:
                raise ValueError(f"cache spec {spec!r}: option {key!r} given twice")
            options[key] = accepted[key].parse(key, text.strip())
            given.append(key)
        return cls(name, MappingProxyType(options), tuple(given))

    @property
    def type(self) -> CacheType:
        return cache_type(self.name)

    def get(self, key: str, default: Any = None) -> Any:
        return self.options.get(key, default)

    def given_options(self) -> dict[str, Any]:
        return {k: self.options[k] for k in self.given}

    def __str__(self) -> str:
        """The canonical spec string: the name and the options given (parse(str(s)) == s)."""
        given = self.given_options()
        return self.name + (":" + ",".join(f"{k}={_text(v)}" for k, v in given.items()) if given else "")


def _text(value: Any) -> str:
    return str(int(value)) if isinstance(value, bool) else str(value)


def _resolve(target):
    if not isinstance(target, str):
        return target
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


_FULL = "kvcache.caches.contiguous:ContiguousKVCache"
_PAGED = "kvcache.caches.paged:PagedKVCache"
_COMPRESSION = ("prompt compression keeps different positions for each KV head, which the paged pool's block "
                "tables (one per sequence, shared by every head) cannot hold; use it in single-stream generate")

REGISTRY: dict[str, CacheType] = {t.name: t for t in (
    CacheType("auto", _FULL, "full precision in the model's dtype (the default; lossless)", _PAGED),
    CacheType("fp32", _FULL, "full precision, float32 (lossless; the model must compute in float32)", _PAGED,
              fixed={"dtype": "float32"}),
    CacheType("fp64", _FULL, "full precision, float64 (lossless; the model must compute in float64)", _PAGED,
              fixed={"dtype": "float64"}),
    CacheType("fp16", _FULL, "full precision, float16 (lossless; the model must compute in float16)", _PAGED,
              fixed={"dtype": "float16"}),
    CacheType("bf16", _FULL, "full precision, bfloat16 (lossless; the model must compute in bfloat16)", _PAGED,
              fixed={"dtype": "bfloat16"}),
    CacheType("int8", "kvcache.caches.quantized:QuantizedKVCache",
              "8-bit group-wise quantized keys and values, full-precision residual (lossy)",
              "kvcache.caches.paged_quantized:PagedQuantizedKVCache", fixed={"bits": 8}),
    CacheType("int4", "kvcache.caches.quantized:QuantizedKVCache",
              "4-bit group-wise quantized, two per byte; KIVI per-channel keys by default, rotation optional (lossy)",
              "kvcache.caches.paged_quantized:PagedQuantizedKVCache", fixed={"bits": 4}),
    CacheType("window", "kvcache.caches.window:WindowKVCache",
              "bounded: the last `size` tokens in a ring buffer plus `sinks` first tokens (StreamingLLM); streams "
              "past the model's context with positions=cache (lossy)",
              "kvcache.caches.paged_window:WindowedPagedKVCache"),
    CacheType("snapkv", "kvcache.caches.compressed:CompressedKVCache",
              "prompt compression: each KV head keeps the `budget` prompt positions its last `window` queries "
              "attend to most (SnapKV); generated tokens appended (lossy)", no_pool=_COMPRESSION,
              fixed={"policy": "snapkv"}),
    CacheType("h2o", "kvcache.caches.compressed:CompressedKVCache",
              "bounded: each KV head keeps `budget` positions, evicting the least attended outside the last "
              "`window` (H2O heavy hitters) (lossy)", no_pool=_COMPRESSION,
              fixed={"policy": "h2o", "kernel": 1}),  # no vote pooling
)}


def register(kind: CacheType) -> None:
    """Add a cache type (a name already taken is refused: unregister it first)."""
    if kind.name in REGISTRY:
        raise ValueError(f"a cache named {kind.name!r} is already registered")
    if not kind.name or not kind.name.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"a cache name is letters, digits, '-' and '_', got {kind.name!r}")
    REGISTRY[kind.name] = kind


def unregister(name: str) -> None:
    cache_type(name)
    del REGISTRY[name]


def cache_type(name: str) -> CacheType:
    if name not in REGISTRY:
        raise ValueError(f"unknown cache {name!r}; registered caches: {', '.join(REGISTRY)}")
    return REGISTRY[name]


def cache_class(name: str) -> type[Cache]:
    return cache_type(name).cache_class()


def parse_spec(spec: str | CacheSpec) -> tuple[str, dict[str, Any]]:
    """``"int4:group=32,residual=128"`` -> ``("int4", {"bits": 4, "group": 32, "residual": 128})``."""
    if spec is None:
        raise TypeError("a cache spec must be a string, got NoneType")
    parsed = CacheSpec.parse(spec)
    return parsed.name, dict(parsed.options)


def make_cache(spec: str | CacheSpec | Cache | None, model, batch: int = 1, capacity: int | None = None) -> Cache:
    """A cache for ``model`` from a spec (None: ``"auto"``); a ``Cache`` object is checked and returned."""
    if isinstance(spec, Cache):
        spec.fits(model, batch)
        return spec
    parsed = CacheSpec.parse(spec)
    return parsed.type.cache_class().for_model(model, batch=batch, capacity=capacity, **parsed.options)


def describe_caches() -> list[tuple[str, str, dict[str, Option]]]:
    """(name, description, free options) for every registered cache, for ``kvcache caches`` and docs."""
    return [(kind.name, kind.description, kind.free_options) for kind in REGISTRY.values()]
