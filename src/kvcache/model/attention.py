"""Scaled dot-product attention over a KV cache, for MHA, MQA and GQA.

Layout follows the literature and Hugging Face: q is (batch, heads, seq_q, d),
k and v are (batch, kv_heads, seq_k, d), with query head h reading KV head
h // group.  The last query row sits at key position seq_k - 1, so a causal
mask is offset by seq_k - seq_q when a cache holds earlier tokens.

Two kernels, chosen by measurement (docs/benchmarks.md):
* one query token (decode): a grouped matmul.  Query heads are viewed as
  (kv_heads, group, d) so every KV head is read once for its whole group; on
  this CPU it streams the cache ~3x faster than SDPA(enable_gqa=True) and
  ~15x faster than materialising repeat_kv.
* many query tokens (prefill): torch's fused SDPA, which never materialises
  the (seq_q, seq_k) score matrix for the causal case.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def causal_mask(seq_q: int, seq_k: int, device: torch.device | None = None, window: int | None = None) -> torch.Tensor:
    """Boolean (seq_q, seq_k) mask, True where query i may attend key j (j <= i + offset).

    With a sliding ``window`` (Mistral), also j > i + offset - window.
    """
    offset = seq_k - seq_q
    rows = torch.arange(seq_q, device=device).unsqueeze(1)
    cols = torch.arange(seq_k, device=device).unsqueeze(0)
    mask = cols <= rows + offset
    if window is not None:
        mask &= cols > rows + offset - window
    return mask


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """One query token per sequence attending to every cached key: grouped matmul."""
    batch, heads, _, dim = q.shape
    kv_heads = k.shape[1]
    qg = q.reshape(batch, kv_heads, heads // kv_heads, dim) * (1.0 / math.sqrt(dim))
    scores = torch.matmul(qg, k.transpose(-1, -2))
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, v).reshape(batch, heads, 1, dim)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
              window: int | None = None) -> torch.Tensor:
    """Causal attention of q over k/v; the causal offset is seq_k - seq_q.

    ``mask`` (bool, broadcastable to (batch, heads, seq_q, seq_k)) replaces the
    causal mask when given, e.g. for padded batches.  ``window`` limits each
    query to its last ``window`` keys (sliding-window attention).
    """
    seq_q, seq_k = q.shape[2], k.shape[2]
    if window is not None and mask is None and seq_k > window:
        if seq_q == 1:
            return decode_attention(q, k[:, :, -window:], v[:, :, -window:])
        mask = causal_mask(seq_q, seq_k, q.device, window)
    if mask is None and seq_q == 1:
        return decode_attention(q, k, v)
    gqa = q.shape[1] != k.shape[1]
    if mask is None and seq_q == seq_k:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    if mask is None:
        mask = causal_mask(seq_q, seq_k, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
