"""Prefill attention with the decode-equivalent view of a block-quantized cache.

A query at position ``p`` reads every block before its own in stored (dequantized) form and its own block,
up to ``p``, in full precision -- what it would have read decoding token by token.  Split that way the
work is two plain problems instead of one masked one over both key sets:

* the *block-causal* part over the dequantized blocks (query ``p`` reads keys ``j < 16 * (p // 16)``),
  one fused SDPA call with a mask over those keys only, which also returns each row's log-sum-exp;
* the *own-block* part: each 16-query block against its own 16 full-precision keys, a small batched matmul.

The two softmax partials are merged through their maxima and sums.  Where the fused kernel is missing (or
the dtype is not float32), one masked SDPA over both key sets computes the same thing.

``banded_view_attention`` is the general view (full-precision sinks, a residual of recent tokens, any
quantization block) for long prompts: queries go in chunks, and a chunk's queries split their keys into the
dequantized tokens all of them read (the fused kernel, no mask) and a small band -- the dequantized tokens
only some read, the full-precision ones -- with a chunk-sized mask.  Memory stays linear in the prompt.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
CHUNK = 256  # queries per step of banded_view_attention: its band's scores are CHUNK x (CHUNK + residual + sinks)


def view_masks(s: int, n: int, block_size: int, quantized: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The additive masks of a chunk of ``n`` queries from position ``s`` over ``quantized`` dequantized tokens:
    the split path's (``dq``, ``no_dq``) or, where it cannot run, the one masked attention's (``both``)."""
    query = torch.arange(s, s + n)[:, None]
    own = query // block_size * block_size
    dq = torch.arange(quantized)[None, :] < own
    if _split(quantized, dtype):
        return {"dq": _additive(dq, dtype), "no_dq": own[:, 0] == 0}
    fp_pos = torch.arange(s // block_size * block_size, s + n)[None, :]
    return {"both": _additive(torch.cat((dq, (fp_pos >= own) & (fp_pos <= query)), 1), dtype)}


def _split(quantized: int, dtype: torch.dtype) -> bool:
    return _FLASH is not None and dtype == torch.float32 and quantized > 0


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, float("-inf"))


def prefill_attention(q: torch.Tensor, dq_k: torch.Tensor | None, dq_v: torch.Tensor | None, fp_k: torch.Tensor,
                      fp_v: torch.Tensor, s: int, block_size: int, masks: dict[str, torch.Tensor]) -> torch.Tensor:
    """q (1, heads, n, d) at positions s..s+n-1; dq_k/dq_v (1, kv_heads, Q, d) the dequantized blocks before the
    last query's block (or None); fp_k/fp_v (1, kv_heads, F, d) full-precision rows from s's block start."""
    group = q.shape[1] // fp_k.shape[1]
    if "both" in masks:
        keys = fp_k if dq_k is None else torch.cat((dq_k, fp_k), 2)
        values = fp_v if dq_v is None else torch.cat((dq_v, fp_v), 2)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=masks["both"], enable_gqa=group > 1)
    out_dq, lse = _FLASH(q, dq_k.repeat_interleave(group, 1), dq_v.repeat_interleave(group, 1), 0.0, False,
                         attn_mask=masks["dq"][None, None])
    lse = lse.masked_fill(masks["no_dq"], float("-inf"))  # rows with no stored block before their own
    out_own, m_own, l_own = _own_block(q, fp_k, fp_v, s, block_size, group)
    m = torch.maximum(lse, m_own)
    w_dq, w_own = torch.exp(lse - m), torch.exp(m_own - m)
    total = (w_dq + l_own * w_own).unsqueeze(-1)
    return (out_dq * w_dq.unsqueeze(-1) + out_own * w_own.unsqueeze(-1)) / total


def _own_block(q: torch.Tensor, fp_k: torch.Tensor, fp_v: torch.Tensor, s: int, block_size: int, group: int):
    """Each query against its own block's full-precision keys up to itself: (unnormalised out, max, sum)."""
    heads, n, dim = q.shape[1], q.shape[2], q.shape[3]
    kv_heads, rows = fp_k.shape[1], fp_k.shape[2]
    lead = s % block_size  # the chunk starts inside a block: pad the queries back to its start
    blocks = -(-(lead + n) // block_size)
    width = blocks * block_size
    qp = q.new_zeros(1, heads, width, dim)
    qp[:, :, lead:lead + n] = q * dim ** -0.5
    kp, vp = fp_k.new_zeros(1, kv_heads, width, dim), fp_v.new_zeros(1, kv_heads, width, dim)
    kp[:, :, :rows], vp[:, :, :rows] = fp_k, fp_v
    qb = qp.view(kv_heads, group, blocks, block_size, dim)
    kb, vb = kp.view(kv_heads, 1, blocks, block_size, dim), vp.view(kv_heads, 1, blocks, block_size, dim)
    scores = qb @ kb.transpose(-1, -2)  # (kv_heads, group, blocks, bs, bs)
    causal = torch.ones(block_size, block_size, dtype=torch.bool).tril()
    scores = scores.masked_fill(~causal, float("-inf"))
    m = scores.amax(-1, keepdim=True)
    e = torch.exp(scores - m)
    out = (e @ vb).reshape(1, heads, width, dim)[:, :, lead:lead + n]
    m = m.reshape(1, heads, width)[:, :, lead:lead + n]
    total = e.sum(-1).reshape(1, heads, width)[:, :, lead:lead + n]
    return out, m, total


def banded_view_attention(q: torch.Tensor, q_pos: torch.Tensor, seen: torch.Tensor, dq_k: torch.Tensor | None,
                          dq_v: torch.Tensor | None, fp_k: torch.Tensor, fp_v: torch.Tensor, fp_pos: torch.Tensor,
                          sinks: int) -> torch.Tensor:
    """Causal attention of q (B, heads, n, d), unscaled, at positions ``q_pos`` (n,) where query i reads the
    first ``seen[i]`` dequantized tokens (dq_k/dq_v (B, kv_heads, Q, d): positions sinks, sinks + 1, ...;
    ``seen`` non-decreasing) and the full-precision rows (fp_k/fp_v (B, kv_heads, F, d) at ascending positions
    ``fp_pos``) up to its own position that are sinks or lie beyond its dequantized ones."""
    n = q.shape[2]
    seen_at, pos_at = seen.tolist(), q_pos.tolist()
    sink_cols = int(torch.searchsorted(fp_pos, sinks))
    flash = _FLASH is not None and q.dtype == torch.float32
    out = torch.empty_like(q)
    for a in range(0, n, CHUNK):
        b = min(n, a + CHUNK)
        full, last = seen_at[a], seen_at[b - 1]  # every query of the chunk reads dequantized tokens [0, full)
        lo = max(sink_cols, int(torch.searchsorted(fp_pos, sinks + full)))
        hi = int(torch.searchsorted(fp_pos, pos_at[b - 1], right=True))
        cols = torch.cat((fp_pos[:sink_cols], fp_pos[lo:hi]))
        band_k = [fp_k[:, :, :sink_cols], fp_k[:, :, lo:hi]]
        band_v = [fp_v[:, :, :sink_cols], fp_v[:, :, lo:hi]]
        if last > full:
            band_k.insert(0, dq_k[:, :, full:last])
            band_v.insert(0, dq_v[:, :, full:last])
        query_pos, query_seen = q_pos[a:b, None], seen[a:b, None]
        col = cols[None, :]
        fp_allowed = (col <= query_pos) & ((col < sinks) | (col >= sinks + query_seen))
        allowed = torch.cat((torch.arange(full, last)[None, :] < query_seen, fp_allowed), 1)
        mask = _additive(allowed, q.dtype)
        keys, values = torch.cat(band_k, 2), torch.cat(band_v, 2)
        if flash:
            band_out, band_lse = _FLASH(q[:, :, a:b], keys, values, 0.0, False, attn_mask=mask[None, None])
            if full == 0:
                out[:, :, a:b] = band_out
                continue
            full_out, full_lse = _FLASH(q[:, :, a:b], dq_k[:, :, :full], dq_v[:, :, :full], 0.0, False)
            m = torch.maximum(band_lse, full_lse)
            w_band, w_full = torch.exp(band_lse - m).unsqueeze(-1), torch.exp(full_lse - m).unsqueeze(-1)
            out[:, :, a:b] = (band_out * w_band + full_out * w_full) / (w_band + w_full)
        else:
            if full:
                keys, values = torch.cat((dq_k[:, :, :full], keys), 2), torch.cat((dq_v[:, :, :full], values), 2)
                mask = torch.cat((mask.new_zeros(b - a, full), mask), 1)
            out[:, :, a:b] = F.scaled_dot_product_attention(q[:, :, a:b], keys, values, attn_mask=mask,
                                                            enable_gqa=q.shape[1] != keys.shape[1])
    return out
