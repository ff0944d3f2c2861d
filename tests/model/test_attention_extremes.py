"""No NaN or inf from finite inputs: every attention path, every dtype, values up to the dtype's maximum."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvcache.caches.contiguous import ContiguousKVCache
from kvcache.caches.paged import BatchEntry, PagedKVCache
from kvcache.caches.quantized import QuantizedKVCache
from kvcache.caches.simple import KVCache, dense_causal_attention
from kvcache.model.attention import attention, finite_attention

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def extreme(shape, dtype, fraction, seed):
    """Values of magnitude up to ``fraction`` of the dtype's maximum, random signs, some tiny."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1
    x[..., ::3] *= 1e-3
    return (x * fraction * torch.finfo(dtype).max).to(dtype)


@settings(max_examples=60)
@given(dtype=st.sampled_from(DTYPES), fraction=st.sampled_from([1e-30, 1e-3, 0.1, 0.5, 1.0]),
       n=st.sampled_from([1, 4]), seed=st.integers(0, 1000), window=st.sampled_from([None, 3]))
def test_attention_is_finite_for_any_finite_input(dtype, fraction, n, seed, window):
    q, k, v = (extreme((1, 4, n if i == 0 else 6, 16), dtype, fraction, seed + i) if i == 0
               else extreme((1, 2, 6, 16), dtype, fraction, seed + i) for i in range(3))
    out = attention(q, k, v, window=window)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert (out.double().abs() <= v.double().abs().max() * (1 + 1e-2)).all()  # a convex combination of values


def test_finite_attention_equals_attention_on_ordinary_inputs():
    q, k, v = torch.randn(2, 4, 5, 16), torch.randn(2, 2, 9, 16), torch.randn(2, 2, 9, 16)
    torch.testing.assert_close(finite_attention(q, k, v), attention(q, k, v))
    # a huge score picks its key: q . k_3 dominates
    q1, k1 = torch.ones(1, 1, 1, 4) * 1e30, torch.zeros(1, 1, 3, 4)
    k1[0, 0, 1] = 1e30
    v1 = torch.arange(12.0).view(1, 1, 3, 4)
    torch.testing.assert_close(finite_attention(q1, k1, v1, torch.ones(1, 3, dtype=torch.bool)), v1[:, :, 1:2])


@pytest.mark.parametrize("dtype", DTYPES)
def test_contiguous_and_paged_caches_stay_finite(dtype):
    q, k, v = (extreme((1, h, 8, 16), dtype, 1.0, i) for i, h in enumerate((4, 2, 2)))
    contiguous = ContiguousKVCache(1, 2, 16, capacity=8, dtype=dtype, check_finite=True)
    assert torch.isfinite(contiguous.attend(0, q, k, v)).all()
    paged = PagedKVCache(1, num_blocks=8, block_size=4, num_kv_heads=2, head_dim=16, dtype=dtype)
    # two sequences sharing block 0 (cascade) decode one token each, after one prefills 8
    paged.prepare([BatchEntry(8, 8, [0, 1])])
    assert torch.isfinite(paged.attend(0, q, k, v)).all()
    paged.prepare([BatchEntry(1, 9, [0, 1, 2]), BatchEntry(1, 6, [0, 3])])
    out = paged.attend(0, q[:, :, :2], k[:, :, :2], v[:, :, :2])
    assert out.dtype == dtype and torch.isfinite(out).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_the_quantized_cache_stays_finite_and_refuses_what_float16_cannot_scale(dtype):
    cache = QuantizedKVCache(1, 2, 32, bits=8, group=16, residual=0, dtype=dtype)
    q = extreme((1, 4, 1, 32), dtype, 1.0, 0)
    k, v = (extreme((1, 2, 40, 32), torch.float16, 0.9, i).to(dtype) for i in (1, 2))
    cache.attend(0, extreme((1, 4, 40, 32), dtype, 1.0, 3), k, v)
    out = cache.attend(0, q, k[:, :, :1], v[:, :, :1])
    assert torch.isfinite(out).all() and cache.qcounts[0] > 0
    if dtype != torch.float16:
        with pytest.raises(ValueError, match="beyond float16 range"):
            cache.attend(0, q, k[:, :, :1] * 4, v[:, :, :1])
        assert len(cache) == 41


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_the_seed_cache_and_the_reference_stay_finite(dtype):
    big = np.finfo(dtype).max
    rng = np.random.default_rng(0)
    K, V, Q = ((rng.random((5, 8)) * 2 - 1) * big for _ in range(3))
    K, V, Q = K.astype(dtype), V.astype(dtype), Q.astype(dtype)
    cache = KVCache()
    for k, v in zip(K, V):
        cache.append(k, v)
    assert np.isfinite(cache.attend(Q[0])).all()
    assert np.isfinite(cache.attend(torch.from_numpy(Q[0])).numpy()).all()
    assert np.isfinite(dense_causal_attention(Q, K, V)).all()
