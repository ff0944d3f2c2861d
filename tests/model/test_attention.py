"""kvcache.model.attention.attention against a naive reference, for MHA, GQA and MQA.

The reference materialises everything: KV heads repeated so query head h reads
KV head h // group, an explicit (seq_q, seq_k) score matrix, and a causal mask
offset by seq_k - seq_q (the last query row sits at the last key position).
"""

from __future__ import annotations

import math

import pytest
import torch

from kvcache.model.attention import attention, causal_mask


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    heads, kv_heads = q.shape[1], k.shape[1]
    group = heads // kv_heads
    k = k.repeat_interleave(group, dim=1)  # query head h -> kv head h // group
    v = v.repeat_interleave(group, dim=1)
    seq_q, seq_k = q.shape[2], k.shape[2]
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    offset = seq_k - seq_q
    allowed = torch.tensor([[j <= i + offset for j in range(seq_k)] for i in range(seq_q)])
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def make_qkv(batch, heads, kv_heads, seq_q, seq_k, dim, dtype, seed=0):
    """Inputs laid out like the model's: (batch, seq, heads, d) transposed, so not contiguous."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seq_q, heads, dim, generator=g, dtype=dtype).transpose(1, 2)
    k = torch.randn(batch, seq_k, kv_heads, dim, generator=g, dtype=dtype).transpose(1, 2)
    v = torch.randn(batch, seq_k, kv_heads, dim, generator=g, dtype=dtype).transpose(1, 2)
    return q, k, v


HEADS = [pytest.param(4, 4, id="mha"), pytest.param(8, 2, id="gqa"), pytest.param(4, 1, id="mqa")]
SEQS = [
    pytest.param(7, 7, id="prefill"),
    pytest.param(3, 10, id="offset"),  # a chunk of 3 new tokens after 7 cached ones
    pytest.param(1, 9, id="decode"),  # grouped-matmul path
    pytest.param(1, 1, id="decode-first"),
]
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("seq_q,seq_k", SEQS)
@pytest.mark.parametrize("heads,kv_heads", HEADS)
def test_matches_naive_reference(heads, kv_heads, seq_q, seq_k, dtype):
    q, k, v = make_qkv(2, heads, kv_heads, seq_q, seq_k, 16, dtype)
    out = attention(q, k, v)
    assert out.shape == (2, heads, seq_q, 16)
    assert out.dtype == dtype
    torch.testing.assert_close(out, reference_attention(q, k, v), rtol=0, atol=TOL[dtype])


@pytest.mark.parametrize("heads,kv_heads", HEADS)
def test_decode_row_equals_last_row_of_prefill(heads, kv_heads):
    """One query token over a cache == the last row of full causal attention."""
    q, k, v = make_qkv(1, heads, kv_heads, 6, 6, 8, torch.float64, seed=1)
    full = attention(q, k, v)
    last = attention(q[:, :, -1:], k, v)
    torch.testing.assert_close(last, full[:, :, -1:], rtol=0, atol=1e-12)


def test_gqa_head_mapping_is_grouped_not_interleaved():
    """Query head h must read KV head h // group (not h % kv_heads)."""
    heads, kv_heads, dim = 4, 2, 4
    q = torch.zeros(1, heads, 1, dim, dtype=torch.float64)
    k = torch.zeros(1, kv_heads, 3, dim, dtype=torch.float64)
    v = torch.stack([torch.full((3, dim), 1.0), torch.full((3, dim), 2.0)]).unsqueeze(0).double()
    out = attention(q, k, v)  # uniform weights: each head returns its KV head's constant value
    assert out[0, :, 0, 0].tolist() == [1.0, 1.0, 2.0, 2.0]


def test_causal_mask_offset():
    assert causal_mask(2, 4).tolist() == [[True, True, True, False], [True, True, True, True]]
    assert causal_mask(3, 3).tolist() == [[True, False, False], [True, True, False], [True, True, True]]
