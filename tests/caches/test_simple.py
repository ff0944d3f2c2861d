"""Tests for the textbook single-head KV cache (kvcache.caches.simple)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from kvcache.caches import KVCache, dense_causal_attention
from kvcache.caches.simple import RestackingKVCache


def as_np(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def snapshot(cache: KVCache) -> dict:
    """Everything observable about a cache, copied so later mutation can't leak in."""
    return {
        "len": len(cache), "dim": cache.dim, "capacity": cache.capacity,
        "nbytes": cache.nbytes, "backend": cache.backend, "dtype": cache.dtype,
        "keys": as_np(cache.keys).copy(), "values": as_np(cache.values).copy(),
    }


def assert_same_snapshot(a: dict, b: dict) -> None:
    for name in ("len", "dim", "capacity", "nbytes", "backend", "dtype"):
        assert a[name] == b[name], name
    for name in ("keys", "values"):
        assert a[name].shape == b[name].shape and a[name].dtype == b[name].dtype
        np.testing.assert_array_equal(a[name], b[name])


# --------------------------------------------------------------------- basics

def test_reference_example():
    cache = KVCache()
    cache.append([1, 0], [10, 20])
    np.testing.assert_allclose(cache.attend([1, 0]), [[10, 20]], rtol=0, atol=1e-12)
    cache.append([1, 0], [30, 40])
    out = cache.attend([1, 0])
    assert isinstance(out, np.ndarray) and out.shape == (1, 2) and out.dtype == np.float64
    np.testing.assert_allclose(out, [[20, 30]], rtol=0, atol=1e-12)


def test_attend_weights_by_scaled_dot_product():
    # Scores 1/sqrt(2) and 0: checks the 1/sqrt(d) scale and the softmax itself.
    cache = KVCache()
    cache.append([1.0, 1.0], [1.0, 0.0])
    cache.append([0.0, 0.0], [0.0, 1.0])
    w = 1 / (1 + math.exp(-1 / math.sqrt(2)))
    np.testing.assert_allclose(cache.attend([1.0, 0.0]), [[w, 1 - w]], rtol=1e-14)


@pytest.mark.parametrize("shape", [(3,), (1, 3)])
def test_row_shapes_accepted(shape):
    cache = KVCache()
    rng = np.random.default_rng(0)
    k, v, q = (rng.standard_normal(shape) for _ in range(3))
    cache.append(k, v)
    cache.append(k.tolist(), torch.from_numpy(v))
    assert len(cache) == 2 and cache.dim == 3
    assert cache.keys.shape == (2, 3) and cache.values.shape == (2, 3)
    np.testing.assert_array_equal(cache.keys[0], k.reshape(-1))
    out = cache.attend(q)
    assert out.shape == (1, 3)
    np.testing.assert_allclose(out, v.reshape(1, 3), rtol=1e-14)  # identical rows


@pytest.mark.parametrize(
    "make, out_type, out_dtype",
    [
        (lambda a: a.tolist(), np.ndarray, np.float64),
        (lambda a: a.astype(np.float64), np.ndarray, np.float64),
        (lambda a: a.astype(np.float32), np.ndarray, np.float32),
        (lambda a: a.astype(np.int64), np.ndarray, np.float64),
        (lambda a: torch.tensor(a, dtype=torch.float64), torch.Tensor, torch.float64),
        (lambda a: torch.tensor(a, dtype=torch.float32), torch.Tensor, torch.float32),
    ],
    ids=["list", "np64", "np32", "np-int", "torch64", "torch32"],
)
def test_output_type_and_dtype_follow_input(make, out_type, out_dtype):
    rng = np.random.default_rng(1)
    data = np.round(rng.standard_normal((4, 3, 5)) * 3)  # integral, so the int case is exact
    cache = KVCache()
    for k, v in zip(data[0], data[1]):
        cache.append(make(k), make(v))
    out = cache.attend(make(data[2][0]))
    assert isinstance(out, out_type) and out.dtype == out_dtype and tuple(out.shape) == (1, 5)
    assert isinstance(cache.keys, out_type) and cache.keys.dtype == out_dtype
    ref = dense_causal_attention(np.vstack([np.zeros((2, 5)), data[2][:1]]), data[0], data[1])[-1:]
    tol = 1e-5 if out_dtype in (np.float32, torch.float32) else 1e-12
    np.testing.assert_allclose(as_np(out), ref, rtol=tol, atol=tol)


def test_float32_cache_with_list_query_computes_in_float64():
    cache = KVCache()
    cache.append(np.array([1, 2], dtype=np.float32), np.array([3, 4], dtype=np.float32))
    assert cache.dtype == np.float32
    assert cache.attend([1, 0]).dtype == np.float64
    assert cache.attend(np.array([1, 0], dtype=np.float32)).dtype == np.float32


def test_cross_backend_append_is_converted():
    # numpy cache: torch rows are converted to numpy in the cache's dtype.
    cache = KVCache()
    cache.append(np.array([1.0, 2.0]), np.array([3.0, 4.0]))
    cache.append(torch.tensor([5.0, 6.0], dtype=torch.float32), torch.tensor([7.0, 8.0]))
    assert cache.backend == "numpy" and isinstance(cache.keys, np.ndarray)
    assert cache.keys.dtype == np.float64
    np.testing.assert_array_equal(cache.keys, [[1, 2], [5, 6]])
    np.testing.assert_array_equal(cache.values, [[3, 4], [7, 8]])

    # torch cache: numpy/list rows are converted to torch in the cache's dtype.
    tcache = KVCache()
    tcache.append(torch.tensor([1.0, 2.0], dtype=torch.float32), [3, 4])
    tcache.append(np.array([5.0, 6.0]), [7, 8])
    assert tcache.backend == "torch" and isinstance(tcache.values, torch.Tensor)
    assert tcache.keys.dtype == torch.float32 and tcache.values.dtype == torch.float32
    np.testing.assert_array_equal(as_np(tcache.keys), [[1, 2], [5, 6]])


def test_cross_backend_attend_returns_query_kind():
    rng = np.random.default_rng(2)
    K, V, Q = rng.standard_normal((3, 6, 4))
    ref = [dense_causal_attention(np.vstack([np.zeros((5, 4)), q[None]]), K, V)[-1:] for q in Q]

    np_cache, t_cache = KVCache(), KVCache()
    for k, v in zip(K, V):
        np_cache.append(k, v)
        t_cache.append(torch.from_numpy(k), torch.from_numpy(v))
    out = np_cache.attend(torch.from_numpy(Q[0]))
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float64
    np.testing.assert_allclose(out.numpy(), ref[0], rtol=1e-12, atol=1e-12)
    out = t_cache.attend(Q[1])
    assert isinstance(out, np.ndarray) and out.dtype == np.float64
    np.testing.assert_allclose(out, ref[1], rtol=1e-12, atol=1e-12)
    out = t_cache.attend(Q[2].tolist())
    assert isinstance(out, np.ndarray)
    np.testing.assert_allclose(out, ref[2], rtol=1e-12, atol=1e-12)


def test_torch_inputs_are_stored_detached():
    k = torch.tensor([1.0, 2.0], requires_grad=True)
    cache = KVCache()
    cache.append(k, k * 2)
    assert not cache.keys.requires_grad and not cache.values.requires_grad


# ----------------------------------------------------- equivalence to dense

@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-12), (np.float32, 1e-5)],
                         ids=["f64", "f32"])
@pytest.mark.parametrize("d", [1, 2, 8, 64])
def test_cached_decoding_matches_dense_causal_attention(d, dtype, tol, backend):
    rng = np.random.default_rng(d)
    T = 50
    Q, K, V = (rng.standard_normal((T, d)).astype(dtype) for _ in range(3))
    ref = dense_causal_attention(Q.astype(np.float64), K.astype(np.float64), V.astype(np.float64))
    wrap = torch.from_numpy if backend == "torch" else (lambda a: a)
    cache = KVCache(capacity=4)  # several growth steps within T
    for t in range(T):
        cache.append(wrap(K[t]), wrap(V[t]))
        out = cache.attend(wrap(Q[t]))
        assert tuple(out.shape) == (1, d)
        assert as_np(out).dtype == dtype
        np.testing.assert_allclose(as_np(out)[0], ref[t], rtol=tol, atol=tol, err_msg=f"t={t}")
    assert len(cache) == T


def test_restacking_cache_matches_kvcache():
    rng = np.random.default_rng(3)
    Q, K, V = rng.standard_normal((3, 20, 8))
    a, b = KVCache(capacity=1), RestackingKVCache()
    for t in range(20):
        a.append(K[t], V[t])
        b.append(K[t], V[t])
        np.testing.assert_allclose(a.attend(Q[t]), b.attend(Q[t]), rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(a.keys, b.K)
    assert len(b) == 20


def test_dense_reference_is_causal_and_exact_on_small_case():
    # Row 0 can only see key 0, so it must return V[0] whatever later keys are.
    Q = np.array([[1.0, 0.0], [1.0, 0.0]])
    K = np.array([[0.0, 0.0], [100.0, 0.0]])
    V = np.array([[1.0, 2.0], [3.0, 4.0]])
    out = dense_causal_attention(Q, K, V)
    np.testing.assert_allclose(out[0], V[0], rtol=0, atol=1e-12)
    np.testing.assert_allclose(out[1], V[1], rtol=0, atol=1e-12)


# ------------------------------------------------- buffer growth (property)

row_values = st.floats(min_value=-1e3, max_value=1e3, allow_nan=False, width=64)


@st.composite
def operations(draw):
    ops = []
    d = draw(st.integers(1, 5))
    for _ in range(draw(st.integers(0, 40))):
        if draw(st.integers(0, 19)) == 0:
            d = draw(st.integers(1, 5))  # a reset may change the width
            ops.append(("reset", d))
            continue
        k = draw(hnp.arrays(np.float64, (d,), elements=row_values))
        v = draw(hnp.arrays(np.float64, (d,), elements=row_values))
        form = draw(st.sampled_from(["1d", "2d", "list", "torch"]))
        ops.append(("append", k, v, form))
    return ops


def _form(a: np.ndarray, form: str):
    return {"1d": a, "2d": a[None, :], "list": a.tolist(), "torch": torch.from_numpy(a.copy())}[form]


@settings(max_examples=60, deadline=None)
@given(ops=operations(), capacity=st.integers(1, 5))
def test_appends_match_list_reference_across_growth(ops, capacity):
    cache = KVCache(capacity=capacity)
    ref_k: list[np.ndarray] = []
    ref_v: list[np.ndarray] = []
    d = None
    for op in ops:
        if op[0] == "reset":
            cache.reset()
            ref_k, ref_v, d = [], [], None
            assert cache.dim is None and cache.nbytes == 0
        else:
            _, k, v, form = op
            if d is None:
                d = k.shape[0]
            cache.append(_form(k, form), _form(v, form))
            ref_k.append(k)
            ref_v.append(v)
        n = len(ref_k)
        assert len(cache) == n
        keys, values = as_np(cache.keys), as_np(cache.values)
        assert keys.shape == values.shape == (n, d or 0)
        if n:
            np.testing.assert_array_equal(keys, np.stack(ref_k))
            np.testing.assert_array_equal(values, np.stack(ref_v))
            # Doubling growth: capacity is initial * 2^m, and at most 2x what's needed.
            cap = cache.capacity
            assert cap >= n and cap % capacity == 0
            m = cap // capacity
            assert m & (m - 1) == 0 and (cap == capacity or cap < 2 * n)
            assert cache.nbytes == 2 * cap * d * 8
    if ref_k:
        q = ref_k[0] / 1e3
        K, V = np.stack(ref_k), np.stack(ref_v)
        s = K @ q / math.sqrt(d)
        w = np.exp(s - s.max())
        np.testing.assert_allclose(cache.attend(q)[0], (w / w.sum()) @ V, rtol=1e-9, atol=1e-9)


def test_growth_is_geometric_not_per_step():
    cache = KVCache(dim=4, capacity=16)
    assert cache.capacity == 16 and cache.nbytes == 0
    seen = set()
    row = np.ones(4)
    for _ in range(1000):
        cache.append(row, row)
        seen.add(cache.capacity)
    assert seen == {16, 32, 64, 128, 256, 512, 1024}
    assert cache.keys.shape == (1000, 4)  # a view of length t, not the whole buffer


def test_keys_are_read_only_views_that_stay_valid():
    cache = KVCache(capacity=2)
    cache.append([1.0], [2.0])
    keys = cache.keys
    with pytest.raises(ValueError):
        keys[0, 0] = 99.0  # the cache must not be corruptible through its views
    for x in range(2, 10):
        cache.append([float(x)], [0.0])
    np.testing.assert_array_equal(keys, [[1.0]])
    assert cache.K.shape == (9, 1) and cache.V.shape == (9, 1)
    np.testing.assert_array_equal(cache.K, cache.keys)


# ------------------------------------------------------------- bad inputs

def _filled(backend: str = "numpy", capacity: int = 2) -> KVCache:
    """A width-2 cache whose buffer is exactly full, so a premature grow would show."""
    cache = KVCache(capacity=capacity)
    wrap = torch.tensor if backend == "torch" else np.array
    cache.append(wrap([1.0, 2.0]), wrap([3.0, 4.0]))
    cache.append(wrap([5.0, 6.0]), wrap([7.0, 8.0]))
    return cache


NAN, INF = float("nan"), float("inf")

BAD_APPENDS = [
    ([1.0, 2.0, 3.0], [1.0, 2.0], ValueError, r"key has width 3 but the cache holds rows of width 2"),
    ([1.0, 2.0], [1.0, 2.0, 3.0], ValueError, r"value has width 3 but the cache holds rows of width 2"),
    ([[1.0, 2.0], [3.0, 4.0]], [1.0, 2.0], ValueError, r"key has 2 rows"),
    ([1.0, 2.0], np.zeros((3, 2)), ValueError, r"value has 3 rows"),
    (np.zeros((1, 1, 2)), [1.0, 2.0], ValueError, r"key has 3 dimensions"),
    ([1.0, 2.0], torch.zeros(1, 1, 1, 2), ValueError, r"value has 4 dimensions"),
    ([], [1.0, 2.0], ValueError, r"key is empty"),
    ([1.0, 2.0], np.zeros((1, 0)), ValueError, r"value is empty"),
    (1.0, [1.0, 2.0], ValueError, r"key is a scalar"),
    ("ab", [1.0, 2.0], TypeError, r"key is a str"),
    (["a", "b"], [1.0, 2.0], TypeError, r"key has non-numeric dtype"),
    ([1.0, 2.0], None, TypeError, r"value is None"),
    (None, None, TypeError, r"key is None"),
    ([1.0, None], [1.0, 2.0], TypeError, r"key has non-numeric dtype"),
    ([1.0, 2.0], [True, False], TypeError, r"value has non-numeric dtype"),
    ([1.0, 2.0], np.array([1 + 1j, 2]), TypeError, r"value has non-numeric dtype"),
    (torch.tensor([True, False]), [1.0, 2.0], TypeError, r"key has non-numeric dtype"),
    ([[1.0, 2.0], [3.0]], [1.0, 2.0], ValueError, r"key could not be read"),
    ([NAN, 2.0], [1.0, 2.0], ValueError, r"key contains non-finite"),
    ([1.0, 2.0], [1.0, INF], ValueError, r"value contains non-finite"),
    ([1.0, 2.0], torch.tensor([-INF, 0.0]), ValueError, r"value contains non-finite"),
    (np.array([1e300, 0.0]), [1.0, 2.0], ValueError, r"key contains non-finite.*float32"),
]


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("k, v, exc, msg", BAD_APPENDS)
def test_bad_append_raises_and_leaves_cache_unchanged(k, v, exc, msg, backend):
    cache = _filled(backend)
    if "float32" in msg:  # overflow on conversion needs a float32 cache
        cache = KVCache(capacity=2)
        cache.append(np.float32([1, 2]), np.float32([3, 4]))
        cache.append(np.float32([5, 6]), np.float32([7, 8]))
    before = snapshot(cache)
    with pytest.raises(exc, match=msg):
        cache.append(k, v)
    assert_same_snapshot(before, snapshot(cache))
    cache.append([0.0, 1.0], [2.0, 3.0])  # still usable afterwards
    assert len(cache) == 3


@pytest.mark.parametrize(
    "k, v, exc, msg",
    [
        ([1.0, 2.0], [1.0, 2.0, 3.0], ValueError, r"key has width 2 but value has width 3"),
        ([NAN], [1.0], ValueError, r"key contains non-finite"),
        ([1.0], "x", TypeError, r"value is a str"),
    ],
)
def test_bad_first_append_leaves_cache_empty_and_unfixed(k, v, exc, msg):
    cache = KVCache()
    with pytest.raises(exc, match=msg):
        cache.append(k, v)
    assert len(cache) == 0 and cache.dim is None and cache.backend is None and cache.nbytes == 0
    cache.append([1.0, 2.0, 3.0], [4.0, 5.0, 6.0])  # width still free to be fixed
    assert cache.dim == 3


def test_append_width_must_match_constructor_dim():
    cache = KVCache(dim=4)
    with pytest.raises(ValueError, match=r"key has width 2 but the cache holds rows of width 4"):
        cache.append([1.0, 2.0], [3.0, 4.0])
    assert len(cache) == 0 and cache.dim == 4


BAD_QUERIES = [
    ([1.0, 2.0, 3.0], ValueError, r"query has width 3 but the cache holds rows of width 2"),
    ([[1.0, 2.0], [1.0, 2.0]], ValueError, r"query has 2 rows"),
    (np.zeros((1, 1, 2)), ValueError, r"query has 3 dimensions"),
    ([], ValueError, r"query is empty"),
    (None, TypeError, r"query is None"),
    ("ab", TypeError, r"query is a str"),
    ([NAN, 0.0], ValueError, r"query contains non-finite"),
    (torch.tensor([0.0, INF]), ValueError, r"query contains non-finite"),
]


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("q, exc, msg", BAD_QUERIES)
def test_bad_query_raises_and_leaves_cache_unchanged(q, exc, msg, backend):
    cache = _filled(backend)
    before = snapshot(cache)
    with pytest.raises(exc, match=msg):
        cache.attend(q)
    assert_same_snapshot(before, snapshot(cache))


def test_attend_on_empty_cache_raises():
    cache = KVCache()
    with pytest.raises(ValueError, match=r"empty cache"):
        cache.attend([1.0, 2.0])
    cache.append([1.0, 2.0], [3.0, 4.0])
    cache.reset()
    with pytest.raises(ValueError, match=r"empty cache"):
        cache.attend([1.0, 2.0])


@pytest.mark.parametrize("kwargs", [{"dim": 0}, {"dim": -1}, {"dim": 2.0}, {"capacity": 0}])
def test_bad_constructor_arguments(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        KVCache(**kwargs)


# ------------------------------------------------------ numerical stability

@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_huge_logits_stay_finite(dtype, backend):
    # Logits ~1e4..1e5: exp overflows unless the row max is subtracted first.
    rng = np.random.default_rng(4)
    K = (rng.standard_normal((10, 8)) * 1e4).astype(dtype)
    V = rng.standard_normal((10, 8)).astype(dtype)
    q = K[3] / np.linalg.norm(K[3]) * 10
    wrap = torch.from_numpy if backend == "torch" else (lambda a: a)
    cache = KVCache()
    for k, v in zip(K, V):
        cache.append(wrap(k), wrap(v))
    out = as_np(cache.attend(wrap(q.astype(dtype))))
    assert np.isfinite(out).all()
    ref = dense_causal_attention(np.vstack([np.zeros((9, 8)), q[None]]), K, V)[-1]
    np.testing.assert_allclose(out[0], ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out[0], V[np.argmax(K @ q)], rtol=1e-4, atol=1e-4)


def test_dense_reference_is_stable_for_huge_logits():
    rng = np.random.default_rng(5)
    Q, K, V = rng.standard_normal((3, 6, 4))
    out = dense_causal_attention(Q * 1e4, K * 1e4, V)
    assert np.isfinite(out).all()


# ------------------------------------------------------------------- reset

def test_reset_empties_and_allows_new_width_backend_and_dtype():
    cache = KVCache(capacity=2)
    for i in range(5):
        cache.append([float(i), 1.0], [1.0, float(i)])
    assert cache.capacity == 8 and cache.nbytes == 2 * 8 * 2 * 8
    cache.reset()
    assert len(cache) == 0 and cache.dim is None and cache.nbytes == 0
    assert cache.capacity == 2 and cache.keys.shape[0] == 0
    cache.append(torch.tensor([1.0, 0.0, 0.0], dtype=torch.float32), torch.tensor([10.0, 20.0, 30.0]))
    assert cache.dim == 3 and cache.backend == "torch" and cache.dtype == torch.float32
    out = cache.attend(torch.tensor([1.0, 0.0, 0.0]))
    np.testing.assert_allclose(out.numpy(), [[10.0, 20.0, 30.0]])


def test_reset_keeps_constructor_dim():
    cache = KVCache(dim=2)
    cache.append([1.0, 2.0], [3.0, 4.0])
    cache.reset()
    assert cache.dim == 2
    with pytest.raises(ValueError, match="width 3"):
        cache.append([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])
