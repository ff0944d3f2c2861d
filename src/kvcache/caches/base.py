"""The two cache contracts, written down: ``Cache`` (single-stream) and ``PagedPool`` (the engine's pool).

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

What the model may also read (optional for a cache of your own; ``Cache`` gives the defaults)
    ``rotates_keys``: True when the cache applies RoPE itself, so the model
    passes queries and keys unrotated (caches/window.py).  ``value_dim``: the
    width of the values (narrower than keys for latent attention).
    ``stores_unattended(layer)``: True when ``update(layer, k, v)`` may store
    this layer's KV without attending and the layer holds nothing yet, so
    latent attention (MLA) runs a prompt in its expanded form.

What speculative decoding reads (optional)
    ``max_rollback``: how many of the newest positions ``crop`` can always take
    back (None: any), and ``rollback_option``, the option that sets it; a draft
    longer than that is refused before the first token.

The engine's pool (``PagedPool``, below) serves a flattened batch of many
sequences through block tables; the registry (caches/registry.py) names, for
every cache type, its ``Cache`` class and its ``PagedPool`` class (or why the
engine does not serve it).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..runtime import check_fits


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
    rotates_keys: ClassVar[bool] = False  # True: keys and queries arrive unrotated; the cache applies RoPE
    max_rollback: int | None = None  # positions crop can always take back (None: any); see the module doc

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

    @property
    def value_dim(self) -> int:
        """Width of the stored values (``head_dim`` unless values are narrower, as with latent attention)."""
        return self.head_dim

    def stores_unattended(self, layer: int) -> bool:
        """True when ``update(layer, k, v)`` stores without attending and ``layer`` holds nothing yet (MLA's
        expanded prompt form); a cache without ``update`` keeps the default, False."""
        return False

    def fits(self, model, batch: int = 1) -> None:
        """Raise ValueError unless this cache is shaped for ``model`` with ``batch`` rows."""
        c = model.config
        want = (batch, c.num_layers, c.cache_kv_heads, c.cache_key_dim)
        have = (self.batch, self.num_layers, self.num_kv_heads, self.head_dim)
        if have != want:
            raise ValueError(f"cache shape (batch {have[0]}, {have[1]} layers, {have[2]} KV heads, head_dim "
                             f"{have[3]}) does not fit this model with batch {batch} ({want[1]} layers, "
                             f"{want[2]} KV heads, head_dim {want[3]})")


@dataclass(frozen=True)
class PoolSizing:
    """What the engine asks of a pool: ``num_blocks`` blocks, or as many as ``budget`` bytes hold."""

    budget: int | None
    num_blocks: int | None
    block_size: int
    max_num_seqs: int  # sequences that can run at once (a quantized pool stages one block for each)
    in_use: Callable[[int], bool]  # is a block id referenced (the block manager's answer)
    label: str = ""  # names the budget in errors

    def blocks(self, block_bytes: int, spec: str) -> int:
        """The block count for blocks of ``block_bytes``, checked to be >= 1 and to fit the machine."""
        blocks = self.num_blocks if self.num_blocks is not None else self.budget // block_bytes
        self.check(blocks, block_bytes, blocks * block_bytes, spec)
        return blocks

    def check(self, blocks: int, block_bytes: int, total: int, spec: str) -> None:
        if blocks < 1:
            raise ValueError(f"kv_memory {self.label} holds no block of {block_bytes} bytes (kv_cache={spec!r})")
        check_fits(total, f"a KV pool of {blocks:,} blocks" + (f" ({self.label})" if self.label else ""))


class PagedPool(ABC):
    """The engine's KV pool contract: what the step plan, the paged kernels and ``LLM`` need.

    A pool holds ``num_blocks`` blocks of ``block_size`` token slots for every layer; the block manager
    (engine/block_manager.py) decides which blocks a sequence owns, the pool only moves tensors.  Per step
    the engine calls ``copy_blocks`` (copy-on-write), ``prepare`` (the flattened batch: one
    ``BatchEntry`` per sequence), then the model calls ``attend`` per layer, and after sampling the engine
    calls ``settle``.  ``for_engine`` builds a pool for a model from a parsed spec and the sizing.

    Attributes every pool sets: ``num_blocks``, ``block_size``, ``spec`` (the single-stream spec that gives
    the same tokens: ``generate(..., cache=pool.spec)``), ``block_bytes`` (one block, every layer),
    ``staging_blocks`` (full-precision blocks for blocks being filled; 0 if none), ``window`` (an
    ``AttentionWindow`` whose blocks behind it the engine releases, or None).
    """

    rotates_keys: ClassVar[bool] = False  # the engine keeps absolute positions: the model rotates
    num_blocks: int
    block_size: int
    spec: str = "auto"
    block_bytes: int = 0
    staging_blocks: int = 0
    window = None  # AttentionWindow | None

    @classmethod
    @abstractmethod
    def for_engine(cls, model, spec, sizing: PoolSizing) -> PagedPool:
        """A pool for ``model`` from ``spec`` (a parsed ``CacheSpec``); ValueError naming what cannot be served."""

    @property
    @abstractmethod
    def nbytes(self) -> int: ...

    @abstractmethod
    def copy_blocks(self, ops) -> None:
        """Copy-on-write: every op's ``src`` block into its ``dst`` block, in every layer."""

    @abstractmethod
    def prepare(self, entries) -> None:
        """Describe the next forward pass: one ``BatchEntry`` per sequence, in the order their tokens are flattened."""

    @abstractmethod
    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               window: int | None = None) -> torch.Tensor:
        """q (1, heads, N, d), k/v (1, kv_heads, N, d) for the N flattened tokens of the prepared batch."""

    # A pool a KV tier can store also defines ``block_tensors() -> {name: (tensor, token axis, entries per
    # block)}``: every tensor holding a full block's KV (engine/tiering.py copies blocks through it).

    def settle(self, still_filling) -> None:
        """After a speculative step's rollback; ``still_filling``: block ids the rollback left partial."""

    def stores_unattended(self, layer: int) -> bool:
        return False  # latent attention runs absorbed over a pool
