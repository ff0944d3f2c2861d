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

Attention split over several key sets (a shared prefix and each sequence's
suffix in cascade attention; quantized chunks and a full-precision residual in
the quantized cache) computes one *partial* per set -- the unnormalised
``exp(s - max) @ v``, its row maxima and row sums -- and merges them exactly
with :func:`merge_partials`.
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


# Half-precision models compute attention in float32 (scores, softmax, weighted sum; the cache stores the
# model's dtype): rounding scores and softmax weights to bfloat16 loses digits, and two implementations of the
# same attention (a contiguous cache's, the paged pool's) then round differently and pick different tokens.
ATTENTION_DTYPE = {torch.bfloat16: torch.float32, torch.float16: torch.float32}

Partial = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (exp(s - m) @ v, m, sum exp(s - m)), m/sum keepdim


def softmax_partial(scores: torch.Tensor, v: torch.Tensor) -> Partial:
    """The partial of already scaled ``scores`` (..., n, t) over values ``v`` (..., t, d); -inf masks a key.

    A row whose keys are all masked yields a zero partial (max -inf becomes 0 so it never makes a NaN).
    """
    m = scores.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(scores - m)
    return torch.matmul(e, v), m, e.sum(-1, keepdim=True)


def combine_partials(parts: list[Partial]) -> Partial:
    """One partial over the union of the parts' key sets (rescaled to their common maximum)."""
    if len(parts) == 1:
        return parts[0]
    m = parts[0][1]
    for _, mi, _ in parts[1:]:
        m = torch.maximum(m, mi)
    out, total = None, None
    for o, mi, li in parts:
        w = torch.exp(mi - m)
        out = o * w if out is None else out + o * w
        total = li * w if total is None else total + li * w
    return out, m, total


def merge_partials(parts: list[Partial]) -> torch.Tensor:
    """Exact softmax attention over the union of the partials' key sets (each row: sum e*v / sum e)."""
    out, _, total = combine_partials(parts)
    return out / total


def grouped_scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Scaled q.k for grouped-query attention without repeating keys: (batch, kv_heads, group, seq, keys)."""
    b, heads, seq, dim = q.shape
    kv_heads = k.shape[1]
    qg = q.view(b, kv_heads, heads // kv_heads, seq, dim)
    return torch.matmul(qg, k.unsqueeze(2).transpose(-1, -2)) * dim ** -0.5


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """One query token per sequence attending to every cached key: grouped matmul."""
    batch, heads, _, dim = q.shape
    kv_heads = k.shape[1]
    qg = q.reshape(batch, kv_heads, heads // kv_heads, dim) * (1.0 / math.sqrt(dim))
    scores = torch.matmul(qg, k.transpose(-1, -2))
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, v).reshape(batch, heads, 1, v.shape[-1])


def finite_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
                     ) -> torch.Tensor:
    """Attention that is finite for every finite input, whatever its dtype: the fallback of every path.

    In float64, queries and keys are divided by their largest magnitudes, so no dot product can overflow; the
    true scale (those maxima times 1/sqrt(d)) multiplies the scores only after their maximum is subtracted,
    so a huge scale sends the others to -inf, never inf - inf; values are rescaled the same way.  The exact
    result is a convex combination of the values, so clamping to the dtype's range only removes rounding.
    ``mask``: bool, broadcastable to (..., seq_q, seq_k), True where a query may attend; None: causal.
    """
    dtype, dim = q.dtype, q.shape[-1]
    qd, kd, vd = q.double(), k.double(), v.double()
    if qd.shape[-3] != kd.shape[-3]:  # grouped-query attention
        group = qd.shape[-3] // kd.shape[-3]
        kd, vd = kd.repeat_interleave(group, -3), vd.repeat_interleave(group, -3)
    if mask is None:
        mask = causal_mask(q.shape[-2], k.shape[-2], q.device)
    tiny = torch.finfo(torch.float64).tiny
    a = qd.abs().amax(-1, keepdim=True).clamp_min(tiny)
    b = kd.abs().amax((-1, -2), keepdim=True).clamp_min(tiny)
    scores = torch.matmul(qd / a, (kd / b).transpose(-1, -2)).masked_fill(~mask, float("-inf"))
    centred = scores - scores.amax(-1, keepdim=True)
    scale = (a * b / math.sqrt(dim)).clamp(tiny, torch.finfo(torch.float64).max)
    weights = torch.softmax((centred * scale).masked_fill(~mask, float("-inf")), dim=-1)
    c = vd.abs().amax((-1, -2), keepdim=True).clamp_min(tiny)
    out = torch.matmul(weights, vd / c) * c
    limit = torch.finfo(dtype).max
    return out.clamp(-limit, limit).to(dtype)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
              window: int | None = None) -> torch.Tensor:
    """Causal attention of q over k/v (see ``_attention``); finite for every finite input; float32 arithmetic
    for half-precision inputs (``ATTENTION_DTYPE``).

    Large but finite inputs can overflow a fast kernel's dot products (then inf - inf gives NaN): such a
    result, checked on the small output, is recomputed by :func:`finite_attention`.
    """
    if q.dtype in ATTENTION_DTYPE:
        compute = ATTENTION_DTYPE[q.dtype]
        return attention(q.to(compute), k.to(compute), v.to(compute), mask, window).to(q.dtype)
    out = _attention(q, k, v, mask, window)
    if torch.isfinite(out.sum()):  # one reduction; a sum that overflows only costs a needless exact recompute
        return out
    if mask is None:
        mask = causal_mask(q.shape[2], k.shape[2], q.device, window)
    return finite_attention(q, k, v, mask)


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
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
    dv = v.shape[-1]
    if dv < q.shape[-1]:  # narrower values (MLA's expanded heads): the fused kernel wants one width, so pad
        v = F.pad(v, (0, q.shape[-1] - dv))  # (PyTorch's fallback for unequal widths builds the whole score matrix)
    if mask is None and seq_q == seq_k:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)[..., :dv]
    if mask is None:
        mask = causal_mask(seq_q, seq_k, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)[..., :dv]
