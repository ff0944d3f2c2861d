"""The textbook single-head KV cache, plus the dense reference it must match.

During autoregressive decoding, step ``t`` attends over the keys and values of
steps ``0..t``. Recomputing them every step costs O(T^2); caching them costs
one row append per step. :class:`KVCache` does that append in amortized O(1)
by writing into a preallocated buffer that doubles when full, instead of
re-stacking the whole history each step (:class:`RestackingKVCache`, kept
only as the benchmark baseline).

Storage rule (the *first* append's **key** decides, the value is converted):

* backend: a ``torch.Tensor`` key gives a torch cache (on the key's device);
  anything else (list, tuple, numpy array, scalar types) gives a numpy cache;
* dtype: floating dtypes are kept (numpy float64/float32, torch float64/
  float32/float16/bfloat16); integers and Python lists become float64.

Later appends from the other backend (or another dtype) are **converted** to
the cache's backend/dtype, not rejected: mixing numpy and torch inputs is
common in glue code and the conversion is lossless for the usual float64 ->
float64 / float32 -> float32 cases. A conversion that overflows (e.g. 1e300
into a float32 cache) is rejected with ``ValueError``.

``attend(q)`` answers in *q's* kind: list/numpy in -> ``np.ndarray`` out,
torch in -> tensor out. It computes in the promoted dtype of the cache and
``q`` (lists count as float64), so float64 never silently drops to float32
while a float32 cache with a float32 query stays float32.

Every bad input raises ``TypeError`` (wrong kind of thing) or ``ValueError``
(right kind, wrong shape/value) *before* anything is mutated, so a failed call
leaves the cache exactly as it was. The cache is for inference: torch inputs
are stored detached (no autograd history is kept).
"""

from __future__ import annotations

import math
from typing import Any, Union

import numpy as np
import torch

from ..checks import is_int
from ..model.attention import finite_attention

__all__ = ["KVCache", "RestackingKVCache", "dense_causal_attention"]

Array = Union[np.ndarray, torch.Tensor]

_ROW_SHAPES = "expected one row of shape (d,) or (1, d)"
_TORCH_INTS = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _describe(dtype: Any) -> str:
    return str(dtype).replace("torch.", "")


def _as_row(x: Any, name: str) -> Array:
    """Validate ``x`` as one finite numeric row and return it 1-D, uncast.

    Torch tensors stay tensors (detached); everything else becomes a numpy
    array (lists/ints as float64 later, via :func:`_storage_dtype`).
    """
    if x is None:
        raise TypeError(f"{name} is None; {_ROW_SHAPES} of numbers")
    if isinstance(x, torch.Tensor):
        row: Array = x.detach()
        if not (row.is_floating_point() or row.dtype in _TORCH_INTS):
            raise TypeError(f"{name} has non-numeric dtype {_describe(row.dtype)} "
                            "(bools or complex numbers are not allowed)")
    else:
        if isinstance(x, (str, bytes)):
            raise TypeError(f"{name} is a {type(x).__name__}, not numbers; {_ROW_SHAPES}")
        try:
            row = np.asarray(x)
        except (ValueError, TypeError) as exc:  # ragged nested lists
            raise ValueError(f"{name} could not be read as a numeric row "
                             f"(ragged or malformed input): {exc}") from None
        if row.dtype.kind not in "iuf":
            raise TypeError(f"{name} has non-numeric dtype {row.dtype} "
                            "(strings, None, bools or complex numbers are not allowed)")
    shape = tuple(row.shape)
    if len(shape) == 0:
        raise ValueError(f"{name} is a scalar; {_ROW_SHAPES}")
    if len(shape) > 2:
        raise ValueError(f"{name} has {len(shape)} dimensions {shape}; {_ROW_SHAPES}")
    if len(shape) == 2 and shape[0] != 1:
        raise ValueError(f"{name} has {shape[0]} rows {shape}; "
                         "append/attend take one row at a time")
    if shape[-1] == 0:
        raise ValueError(f"{name} is empty {shape}; {_ROW_SHAPES} with d >= 1")
    row = row.reshape(-1)
    _check_finite(row, name)
    return row


def _check_finite(row: Array, name: str, note: str = "") -> None:
    finite = torch.isfinite(row).all() if isinstance(row, torch.Tensor) else np.isfinite(row).all()
    if not bool(finite):
        raise ValueError(f"{name} contains non-finite values (nan or inf){note}")


def _storage_dtype(row: Array) -> Any:
    """Dtype a cache gets when ``row`` is its first key: floats kept, ints -> float64."""
    if isinstance(row, torch.Tensor):
        return row.dtype if row.is_floating_point() else torch.float64
    return row.dtype if row.dtype.kind == "f" else np.dtype(np.float64)


def _to_numpy(x: Array) -> np.ndarray:
    if isinstance(x, np.ndarray):
        return x
    x = x.detach().cpu()
    if x.dtype == torch.bfloat16:  # numpy has no bfloat16
        x = x.to(torch.float32)
    return x.numpy()


def _to_torch(x: Array, device: torch.device | None = None) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x if device is None else x.to(device)
    if not x.flags.writeable:  # torch warns on (and could write through) read-only memory
        x = x.copy()
    return torch.as_tensor(x, device=device)


class KVCache:
    """Single-head KV cache: one ``(d,)`` key row and value row per decoding step.

    Rows live in preallocated ``(capacity, d)`` buffers; when a buffer is full
    it is replaced by one of twice the size (rows copied once), so ``append``
    is amortized O(1) and memory is at most 2x what the rows need.
    """

    def __init__(self, dim: int | None = None, capacity: int = 16) -> None:
        if dim is not None and (not is_int(dim) or dim < 1):
            raise ValueError(f"dim must be a positive int or None, got {dim!r}")
        if not is_int(capacity) or capacity < 1:
            raise ValueError(f"capacity must be a positive int, got {capacity!r}")
        self._init_dim = dim
        self._init_capacity = capacity
        self.reset()

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """Empty the cache and free its buffers.

        Width, backend and dtype are forgotten too (the next append fixes them
        again), except that a ``dim`` given to the constructor still applies.
        """
        self._dim: int | None = self._init_dim
        self._k: Array | None = None
        self._v: Array | None = None
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def __repr__(self) -> str:
        return (f"KVCache(len={self._len}, dim={self._dim}, capacity={self.capacity}, "
                f"backend={self.backend}, dtype={self.dtype})")

    @property
    def dim(self) -> int | None:
        """Row width d, or None until the first append fixes it."""
        return self._dim

    @property
    def capacity(self) -> int:
        """Rows the cache holds before its next reallocation."""
        return self._init_capacity if self._k is None else int(self._k.shape[0])

    @property
    def nbytes(self) -> int:
        """Bytes allocated for the key and value buffers (including unused rows)."""
        if self._k is None:
            return 0
        if isinstance(self._k, torch.Tensor):
            return 2 * self._k.numel() * self._k.element_size()
        return int(self._k.nbytes + self._v.nbytes)

    @property
    def backend(self) -> str | None:
        """'numpy' or 'torch' once the first append has fixed it, else None."""
        if self._k is None:
            return None
        return "torch" if isinstance(self._k, torch.Tensor) else "numpy"

    @property
    def dtype(self) -> Any:
        """Storage dtype (numpy dtype or torch dtype), or None before the first append."""
        return None if self._k is None else self._k.dtype

    def _rows(self, buf: Array | None) -> Array:
        if buf is None:
            return np.empty((0, self._dim or 0), dtype=np.float64)
        view = buf[: self._len]
        if isinstance(view, np.ndarray):
            # Read-only: a caller must not be able to corrupt the cache through it.
            view = view.view()
            view.flags.writeable = False
        return view

    @property
    def keys(self) -> Array:
        """The cached keys, shape ``(len, d)``: a view of the buffer, not a copy.

        Rows 0..len-1 are never overwritten (growth copies into a new buffer),
        so the view stays a valid snapshot after later appends.
        """
        return self._rows(self._k)

    @property
    def values(self) -> Array:
        """The cached values, shape ``(len, d)`` (view, see :attr:`keys`)."""
        return self._rows(self._v)

    K = keys
    V = values

    # -------------------------------------------------------------- mutation
    def append(self, k: Any, v: Any) -> None:
        """Append one key row and one value row (each ``(d,)`` or ``(1, d)``).

        All validation and conversion happen before any state changes.
        """
        k_row = _as_row(k, "key")
        v_row = _as_row(v, "value")
        dk, dv = int(k_row.shape[0]), int(v_row.shape[0])
        if self._dim is not None:
            for name, d in (("key", dk), ("value", dv)):
                if d != self._dim:
                    raise ValueError(f"{name} has width {d} but the cache holds rows "
                                     f"of width {self._dim}")
        if dk != dv:
            raise ValueError(f"key has width {dk} but value has width {dv}; "
                             "this cache needs keys and values of equal width")

        if self._k is None:
            like = k_row
            dtype = _storage_dtype(k_row)
        else:
            like = self._k
            dtype = self._k.dtype
        k_row = self._convert(k_row, like, dtype, "key")
        v_row = self._convert(v_row, like, dtype, "value")

        if self._k is None:
            kb, vb = self._alloc(like, dtype, self._init_capacity, dk)
        elif self._len == self._k.shape[0]:
            kb, vb = self._alloc(like, dtype, 2 * self._len, dk)
            kb[: self._len] = self._k[: self._len]
            vb[: self._len] = self._v[: self._len]
        else:
            kb, vb = self._k, self._v
        kb[self._len] = k_row
        vb[self._len] = v_row
        self._k, self._v, self._dim = kb, vb, dk
        self._len += 1

    @staticmethod
    def _convert(row: Array, like: Array, dtype: Any, name: str) -> Array:
        """Cast ``row`` to the cache's backend/dtype; reject overflow."""
        if isinstance(like, torch.Tensor):
            out = _to_torch(row, like.device).to(dtype)
        else:
            with np.errstate(over="ignore"):
                out = _to_numpy(row).astype(dtype, copy=False)
        _check_finite(out, name, f" after conversion to the cache dtype {_describe(dtype)}")
        return out

    @staticmethod
    def _alloc(like: Array, dtype: Any, rows: int, d: int) -> tuple[Array, Array]:
        if isinstance(like, torch.Tensor):
            mk = lambda: torch.empty((rows, d), dtype=dtype, device=like.device)  # noqa: E731
        else:
            mk = lambda: np.empty((rows, d), dtype=dtype)  # noqa: E731
        return mk(), mk()

    # ----------------------------------------------------------------- query
    def attend(self, q: Any) -> Array:
        """softmax(q K^T / sqrt(d)) V over every cached row; shape ``(1, d)``.

        Returned in q's kind (torch -> tensor, otherwise ndarray), computed in
        the promoted dtype of q and the cache.
        """
        q_row = _as_row(q, "query")
        if self._len == 0:
            raise ValueError("attend on an empty cache; append at least one row first")
        if int(q_row.shape[0]) != self._dim:
            raise ValueError(f"query has width {int(q_row.shape[0])} but the cache holds "
                             f"rows of width {self._dim}")
        # Raw buffer slices (writable), so torch.as_tensor can share their memory.
        K, V = self._k[: self._len], self._v[: self._len]
        scale = 1.0 / math.sqrt(self._dim)
        if isinstance(q_row, torch.Tensor):
            K, V = _to_torch(K, q_row.device), _to_torch(V, q_row.device)
            dt = torch.promote_types(_storage_dtype(q_row), K.dtype)
            q_row, K, V = q_row.to(dt), K.to(dt), V.to(dt)
            s = K @ (q_row * scale)
            w = torch.exp(s - s.max())
            out = ((w / w.sum()) @ V).reshape(1, -1)
            return out if torch.isfinite(out).all() else _finite(q_row, K, V)
        else:
            K, V = _to_numpy(K), _to_numpy(V)
            dt = np.promote_types(_storage_dtype(q_row), K.dtype)
            q_row, K, V = q_row.astype(dt, copy=False), K.astype(dt, copy=False), V.astype(dt, copy=False)
            with np.errstate(over="ignore", invalid="ignore"):
                s = K @ (q_row * dt.type(scale))
                w = np.exp(s - s.max())
                out = ((w / w.sum()) @ V).reshape(1, -1)
            return out if np.isfinite(out).all() else _finite(q_row, K, V)


class RestackingKVCache:
    """The naive O(T^2) cache: ``np.vstack`` the whole history on every append.

    Benchmark baseline only; minimal validation, numpy float64 only.
    """

    def __init__(self) -> None:
        self.K: np.ndarray | None = None
        self.V: np.ndarray | None = None

    def __len__(self) -> int:
        return 0 if self.K is None else int(self.K.shape[0])

    def append(self, k: Any, v: Any) -> None:
        k = np.asarray(k, dtype=np.float64).reshape(1, -1)
        v = np.asarray(v, dtype=np.float64).reshape(1, -1)
        self.K = k if self.K is None else np.vstack([self.K, k])
        self.V = v if self.V is None else np.vstack([self.V, v])

    def attend(self, q: Any) -> np.ndarray:
        if self.K is None:
            raise ValueError("attend on an empty cache")
        q = np.asarray(q, dtype=np.float64).reshape(-1)
        s = self.K @ q / math.sqrt(q.shape[0])
        w = np.exp(s - s.max())
        return ((w / w.sum()) @ self.V).reshape(1, -1)


def dense_causal_attention(Q: Any, K: Any, V: Any) -> np.ndarray:
    """softmax(Q K^T / sqrt(d) + causal mask) V, the no-cache reference.

    Q is ``(Tq, d)``, K ``(Tk, d)``, V ``(Tk, dv)`` with ``Tq <= Tk``; query i
    sees keys ``0 .. i + Tk - Tq`` (queries are the last Tq positions). Row
    max is subtracted before ``exp``. Computes in float64 unless all inputs
    are float32 (or narrower).
    """
    Q, K, V = (_to_numpy(x) if isinstance(x, torch.Tensor) else np.asarray(x) for x in (Q, K, V))
    if Q.ndim != 2 or K.ndim != 2 or V.ndim != 2:
        raise ValueError(f"Q, K, V must be 2-D, got shapes {Q.shape}, {K.shape}, {V.shape}")
    (tq, d), tk = Q.shape, K.shape[0]
    if K.shape[1] != d or V.shape[0] != tk or tq > tk:
        raise ValueError(f"incompatible shapes Q{Q.shape} K{K.shape} V{V.shape}")
    dt = np.result_type(Q.dtype, K.dtype, V.dtype, np.float32)
    Q, K, V = (x.astype(dt, copy=False) for x in (Q, K, V))
    future = np.triu(np.ones((tq, tk), dtype=bool), k=tk - tq + 1)
    with np.errstate(over="ignore", invalid="ignore"):
        s = (Q * dt.type(1.0 / math.sqrt(d))) @ K.T
        s[future] = -np.inf
        w = np.exp(s - s.max(axis=1, keepdims=True))
        out = (w / w.sum(axis=1, keepdims=True)) @ V
    if np.isfinite(out).all():
        return out
    mask = torch.from_numpy(~future)
    return finite_attention(*(torch.from_numpy(np.ascontiguousarray(x))[None, None] for x in (Q, K, V)),
                            mask)[0, 0].numpy()


def _finite(q_row, K, V):
    """One query row over a whole cache, through the overflow-proof path (returned in q's kind)."""
    as_torch = isinstance(q_row, torch.Tensor)
    q, k, v = (x if as_torch else torch.from_numpy(np.ascontiguousarray(x)) for x in (q_row, K, V))
    out = finite_attention(q.reshape(1, 1, 1, -1), k[None, None], v[None, None],
                           torch.ones(1, k.shape[0], dtype=torch.bool)).reshape(1, -1)
    return out if as_torch else out.numpy()
