"""The split prefill (block-causal part over dequantized blocks + own-block part) equals one masked attention
over both key sets, and both equal a dense reference built query by query."""

from __future__ import annotations

import pytest
import torch

import kvcache.caches.prefill_view as prefill_view
from kvcache.caches.prefill_view import prefill_attention, view_masks


def reference(q, dq_k, dq_v, fp_k, fp_v, s, bs):
    """Query p: dequantized keys before its block, full-precision keys of its block up to p (dense softmax)."""
    heads, n, dim = q.shape[1], q.shape[2], q.shape[3]
    group = heads // fp_k.shape[1]
    start = s // bs * bs
    out = torch.empty_like(q)
    for i in range(n):
        p = s + i
        own = p // bs * bs
        keys = torch.cat((dq_k[:, :, :own], fp_k[:, :, own - start:p - start + 1]), 2).repeat_interleave(group, 1)
        values = torch.cat((dq_v[:, :, :own], fp_v[:, :, own - start:p - start + 1]), 2).repeat_interleave(group, 1)
        w = torch.softmax(q[:, :, i:i + 1] @ keys.transpose(-1, -2) * dim ** -0.5, -1)
        out[:, :, i:i + 1] = w @ values
    return out


@pytest.mark.parametrize("split", [True, False])
@pytest.mark.parametrize("s,n", [(0, 40), (5, 27), (16, 16), (37, 1 + 4), (3, 2)])
def test_prefill_view_equals_the_reference(monkeypatch, split, s, n):
    if not split:
        monkeypatch.setattr(prefill_view, "_FLASH", None)
    elif prefill_view._FLASH is None:
        pytest.skip("this torch has no fused CPU flash attention")
    g = torch.Generator().manual_seed(s * 100 + n)
    bs, kv, group, dim = 16, 2, 3, 32
    end = s + n
    quantized = (end - 1) // bs * bs
    rows = end - s // bs * bs
    q = torch.randn(1, kv * group, n, dim, generator=g)
    dq_k, dq_v = (torch.randn(1, kv, quantized, dim, generator=g) for _ in range(2))
    fp_k, fp_v = (torch.randn(1, kv, rows, dim, generator=g) for _ in range(2))
    masks = view_masks(s, n, bs, quantized, torch.float32)
    got = prefill_attention(q, dq_k if quantized else None, dq_v if quantized else None, fp_k, fp_v, s, bs, masks)
    torch.testing.assert_close(got, reference(q, dq_k, dq_v, fp_k, fp_v, s, bs), atol=1e-5, rtol=1e-5)
