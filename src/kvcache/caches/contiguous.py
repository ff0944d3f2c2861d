"""The multi-layer KV cache of a decoder: one contiguous buffer per K and V.

Storage is two tensors shaped (layers, batch, kv_heads, capacity, head_dim),
so MHA (kv_heads == heads), MQA (1) and GQA (in between) are one code path.
Values may be narrower than keys (``value_dim``).  A latent (MLA) cache stores
one tensor: its values are the first ``value_dim`` channels of its keys
(``values_in_keys``), a view, so each token's ``[c_kv | k_pe]`` is held once.
``update`` writes new positions and returns views over the whole cached
sequence, which attention reads in place (no copy per step).

Growth policy: preallocate.  ``generate`` knows prompt + max_new_tokens and
sizes the cache exactly, so decoding never reallocates; a caller that
overruns the capacity gets geometric (doubling) growth, which keeps append
amortised O(1).  Measured in docs/benchmarks.md: torch.cat per step
(transformers' DynamicCache) copies O(T^2) bytes in total.

Every call validates before it touches anything, so a refused call leaves
the cache exactly as it was.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from ..checks import check_int, is_int
from ..model.attention import ATTENTION_DTYPE, attention
from ..runtime import check_fits
from . import kernels
from .base import Cache, Option

DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}


class CacheIndexError(IndexError, ValueError):
    """A layer or batch index out of range.

    Both an IndexError (it is an index) and a ValueError (it is a bad
    argument), so callers following either convention catch it.
    """


def batch_index_tensor(batch_indices, batch: int) -> torch.Tensor:
    """Validate a batch selection (non-empty, 1-D, integers in [0, batch)) and return it as a long tensor."""
    if isinstance(batch_indices, (torch.Tensor, np.ndarray)):
        t = torch.as_tensor(batch_indices)
        if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
            raise TypeError(f"batch_indices must hold integers, got a tensor of dtype {t.dtype}")
        if t.dim() != 1:
            raise ValueError(f"batch_indices must be 1-D, got shape {tuple(t.shape)}")
        values = t.tolist()
    elif isinstance(batch_indices, (Sequence, range)) and not isinstance(batch_indices, (str, bytes)):
        values = list(batch_indices)
        for i in values:
            nested = isinstance(i, Sequence) or getattr(i, "ndim", 0) > 0
            if nested and not isinstance(i, (str, bytes)):
                raise ValueError("batch_indices must be 1-D (a flat sequence of integers), got a nested sequence")
            if not is_int(i):
                raise TypeError(f"batch_indices must hold integers, got {i!r} ({type(i).__name__})")
    else:
        raise TypeError("batch_indices must be a 1-D sequence or tensor of integers, "
                        f"got {type(batch_indices).__name__}")
    if not values:
        raise ValueError("batch_indices must be non-empty: a cache holds at least one sequence")
    bad = [int(i) for i in values if not 0 <= i < batch]
    if bad:
        raise CacheIndexError(f"batch_indices {bad} out of range for batch {batch} (valid: 0..{batch - 1})")
    return torch.tensor([int(i) for i in values], dtype=torch.long)


def check_layer(layer, num_layers: int) -> int:
    """``layer`` as an int in [0, num_layers), or a TypeError / CacheIndexError naming it."""
    if not is_int(layer):
        raise TypeError(f"layer must be an integer, got {layer!r} ({type(layer).__name__})")
    if not 0 <= layer < num_layers:
        raise CacheIndexError(f"layer {layer} out of range for a cache of {num_layers} layers "
                              f"(valid: 0..{num_layers - 1})")
    return int(layer)


def check_kv(cache, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
    """Refuse new keys/values that do not fit ``cache`` (its batch, KV heads, head_dim, dtype, device)."""
    for name, t in (("key", k), ("value", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be (batch, kv_heads, seq, head_dim), got shape {tuple(t.shape)}")
        b, h, _, d = t.shape
        if b != cache.batch:
            raise ValueError(f"{name} has batch {b} but the cache holds batch {cache.batch}")
        if h != cache.num_kv_heads:
            raise ValueError(f"{name} has {h} KV heads but the cache holds {cache.num_kv_heads}")
        want = cache.head_dim if name == "key" else cache.value_dim
        if d != want:
            raise ValueError(f"{name} has head_dim {d} but the cache holds {want}")
        if t.dtype != cache.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but the cache stores {cache.dtype}")
        if t.device != cache.device:
            raise ValueError(f"{name} is on {t.device} but the cache is on {cache.device}")
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"key has {k.shape[2]} positions but value has {v.shape[2]}")
    if cache.check_finite and not (torch.isfinite(k).all() and torch.isfinite(v).all()):
        raise ValueError(f"non-finite values (nan/inf) in the keys or values for layer {layer}")


class ContiguousKVCache(Cache):
    """Full-precision K/V for every layer in two preallocated tensors (lossless)."""

    options = {"dtype": Option(str, None, "storage dtype; must be the model's (default: the model's)",
                               choices=tuple(DTYPES))}

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        batch: int = 1,
        capacity: int = 256,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        check_finite: bool = True,
        value_dim: int | None = None,
        values_in_keys: bool = False,
    ):
        num_layers, num_kv_heads, head_dim, batch, capacity = (
            check_int(value, name, minimum=1) for name, value in (
                ("num_layers", num_layers), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim),
                ("batch", batch), ("capacity", capacity)))
        value_dim = head_dim if value_dim is None else check_int(value_dim, "value_dim", minimum=1)
        if values_in_keys and value_dim > head_dim:
            raise ValueError(f"values_in_keys needs value_dim ({value_dim}) <= head_dim ({head_dim})")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
        if not isinstance(check_finite, bool):
            raise TypeError(f"check_finite must be a bool, got {check_finite!r}")
        shape = (num_layers, batch, num_kv_heads, capacity, head_dim)
        per_position = head_dim + (0 if values_in_keys else value_dim)
        check_fits(math.prod(shape[:4]) * per_position * torch.empty((), dtype=dtype).element_size(),
                   f"a KV cache of {capacity:,} positions x batch {batch}")
        self._value_dim, self.values_in_keys = value_dim, values_in_keys
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = self._values_of(self.k, torch.zeros(shape[:4] + (value_dim,), dtype=dtype, device=device)
                                 if not values_in_keys else None)
        self.lengths = [0] * num_layers  # per layer: a forward pass fills layers in order
        self.check_finite = check_finite
        self._single_block = None

    def _values_of(self, k: torch.Tensor, v: torch.Tensor | None) -> torch.Tensor:
        """The value store: ``v``, or (values in keys) a view of the keys' first ``value_dim`` channels."""
        return k[..., :self.value_dim] if self.values_in_keys else v

    @classmethod
    def for_model(cls, model, batch: int = 1, capacity: int | None = None, dtype: str | None = None,
                  check_finite: bool = False) -> "ContiguousKVCache":
        """Shaped for ``model``; the model's own activations need no finiteness check, so it is off here."""
        if dtype is not None and DTYPES[dtype] != model.dtype:
            raise ValueError(f"a {dtype} cache cannot serve this model, which computes in "
                             f"{str(model.dtype).removeprefix('torch.')}; omit the dtype (or use 'auto')")
        cfg = model.config
        return cls(cfg.num_layers, cfg.cache_kv_heads, cfg.cache_key_dim, batch=batch,
                   capacity=cfg.max_positions if capacity is None else capacity, dtype=model.dtype,
                   check_finite=check_finite, value_dim=cfg.cache_value_dim, values_in_keys=cfg.values_in_keys)

    # --- shape -------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return self.k.shape[0]

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @property
    def num_kv_heads(self) -> int:
        return self.k.shape[2]

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    @property
    def head_dim(self) -> int:
        return self.k.shape[4]

    @property
    def dtype(self) -> torch.dtype:
        return self.k.dtype

    @property
    def device(self) -> torch.device:
        return self.k.device

    def __len__(self) -> int:
        """Positions cached in every layer (the sequence length seen by the next token)."""
        return self.lengths[-1]

    @property
    def nbytes(self) -> int:
        """Bytes reserved (capacity), not just used; see ``used_bytes``."""
        return self.k.nbytes + (0 if self.values_in_keys else self.v.nbytes)

    @property
    def value_dim(self) -> int:
        return self._value_dim

    def stores_unattended(self, layer: int) -> bool:
        """``update`` stores without attending: latent attention runs an empty layer's prompt expanded -- in
        float32 and float64 only: in half precision the expanded and absorbed forms round differently, and the
        engine's pools (always absorbed) would then pick other tokens than ``generate``."""
        return self.layer_length(layer) == 0 and self.dtype not in ATTENTION_DTYPE

    def layer_length(self, layer: int) -> int:
        """Positions cached in ``layer`` (during a forward pass, earlier layers are ahead of later ones)."""
        return self.lengths[self._layer(layer)]

    @property
    def used_bytes(self) -> int:
        return self.nbytes * len(self) // self.capacity

    # --- writes ------------------------------------------------------------
    def _layer(self, layer: int) -> int:
        return check_layer(layer, self.num_layers)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append k/v (batch, kv_heads, n, d) to ``layer``; return views of all its cached K and V.

        All or nothing: a refused call (or a failed reallocation) leaves the cache as it was.
        """
        layer = self._layer(layer)
        check_kv(self, layer, k, v)
        start = self.lengths[layer]
        end = start + k.shape[2]
        if end > self.capacity:
            self._grow(end)
        self.k[layer, :, :, start:end] = k
        if not self.values_in_keys:
            self.v[layer, :, :, start:end] = v
        self.lengths[layer] = end
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               window: int | None = None) -> torch.Tensor:
        """Store k/v, then causal attention of q over the whole cached sequence (or its last ``window``)."""
        keys, values = self.update(layer, k, v)
        if window is None and q.shape[0] == 1 and q.shape[2] == 1 and not self.values_in_keys:
            out = self._decode_in_place(self._layer(layer), q, keys.shape[2])
            if out is not None:
                return out
        return attention(q, keys, values, window=window)

    def _decode_in_place(self, layer: int, q: torch.Tensor, length: int) -> torch.Tensor | None:
        """One sequence's one-token step read straight from the cache by the compiled paged kernel (the cache as
        a single block): no matmul over a strided view, no softmax pass.  None where it does not apply."""
        heads, kv_heads, dim = q.shape[1], self.k.shape[2], q.shape[3]
        if q.dtype != torch.float32 or self.k.dtype != torch.float32 or not kernels.paged_usable(q, heads // kv_heads):
            return None
        if self._single_block is None:
            self._single_block = torch.zeros(1, 1, dtype=torch.int32)  # block table, window start, sinks: all 0
        zero = self._single_block
        qg = q.reshape(1, kv_heads, heads // kv_heads, dim)
        out = kernels.paged_decode(qg, dim ** -0.5, self.k[layer, 0], self.v[layer, 0], self.value_dim, zero,
                                   self.capacity, torch.tensor([length], dtype=torch.int32), zero[0], zero[0])
        return None if out is None else out.view(1, heads, 1, self.value_dim)

    def _grow(self, needed: int) -> None:
        new_cap = max(needed, 2 * self.capacity)
        check_fits(self.nbytes // self.capacity * new_cap, f"growing the KV cache to {new_cap:,} positions")
        grown = []
        for old in (self.k,) if self.values_in_keys else (self.k, self.v):  # allocate all before replacing any
            new = old.new_zeros(old.shape[:3] + (new_cap, old.shape[4]))
            new[:, :, :, : old.shape[3]] = old
            grown.append(new)
        self.k, self.v = grown[0], self._values_of(grown[0], grown[-1])

    # --- edits -------------------------------------------------------------
    def crop(self, length: int) -> None:
        """Roll back to the first ``length`` positions (speculative decoding rejects drafts)."""
        if not is_int(length):
            raise TypeError(f"cannot crop to {length!r}: the length must be an integer, got {type(length).__name__}")
        if not 0 <= length <= len(self):
            raise ValueError(f"cannot crop to {length}: the cache holds {len(self)} positions")
        self.lengths = [min(n, int(length)) for n in self.lengths]

    def select(self, batch_indices: Sequence[int] | torch.Tensor) -> None:
        """Keep/reorder/duplicate batch rows (beam search reorders beams each step).

        ``batch_indices``: a non-empty 1-D list/tuple/range/tensor/array of
        integers in [0, batch); the new batch size is its length.
        """
        idx = batch_index_tensor(batch_indices, self.batch).to(self.k.device)
        k = self.k.index_select(1, idx)
        v = None if self.values_in_keys else self.v.index_select(1, idx)  # both before replacing either
        self.k, self.v = k, self._values_of(k, v)

    reorder = select

    def reset(self) -> None:
        self.lengths = [0] * self.num_layers

    def keys(self, layer: int) -> torch.Tensor:
        layer = self._layer(layer)
        return self.k[layer, :, :, : self.lengths[layer]]

    def values(self, layer: int) -> torch.Tensor:
        layer = self._layer(layer)
        return self.v[layer, :, :, : self.lengths[layer]]
