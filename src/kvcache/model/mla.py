"""Multi-head latent attention (DeepSeek-V2/V3), caching one latent per token instead of K and V per head.

Per token and layer the cache holds ``[c_kv | k_pe]``: the normalised compressed latent (``kv_lora_rank``
values) and the shared RoPE key (``qk_rope_head_dim``), one "KV head" whose values are its first
``kv_lora_rank`` channels.  Two ways to attend, equal up to rounding:

* **expanded** (prefill from an empty cache, and the uncached forward): ``kv_b_proj`` up-projects each latent
  to per-head keys ``[k_nope | k_pe]`` and values, then causal attention as in plain multi-head attention.
* **absorbed** (decode, and anything attending to cached latents): ``W_UK`` is folded into the query
  (``q_nope @ W_UK`` is a vector in latent space), attention runs as multi-query attention directly over the
  cached latents through the cache's ``attend`` (keys ``[c_kv | k_pe]``, values ``c_kv``), and ``W_UV``
  turns the latent output into each head's value output.  Nothing is up-projected per cached token.

Caches apply 1/sqrt(d) of the width they see; queries are pre-scaled so that the product is MLA's own
softmax scale.  ``cache_expanded = True`` instead caches the up-projected per-head K/V (as transformers 4.x
did), for comparing memory and speed.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .attention import attention
from .config import ModelConfig
from .linear import Linear
from .rope import apply_rope


class LatentAttention(nn.Module):
    cache_expanded = False  # True: cache up-projected per-head K/V (the expensive baseline)

    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        m, H = config.mla, config.hidden_size
        self.layer, self.heads, self.mla = layer, config.num_heads, m
        qk = m.qk_nope_head_dim + m.qk_rope_head_dim
        if m.q_lora_rank is None:
            self.q_proj = Linear(H, self.heads * qk, bias=False)
        else:
            self.q_a_proj = Linear(H, m.q_lora_rank, bias=config.attention_bias)
            self.q_a_norm = nn.RMSNorm(m.q_lora_rank, eps=1e-6)
            self.q_b_proj = Linear(m.q_lora_rank, self.heads * qk, bias=False)
        self.kv_a_proj = Linear(H, m.latent_dim, bias=config.attention_bias)
        self.kv_a_norm = nn.RMSNorm(m.kv_lora_rank, eps=1e-6)
        self.kv_b_proj = Linear(m.kv_lora_rank, self.heads * (m.qk_nope_head_dim + m.v_head_dim), bias=False)
        self.out = Linear(self.heads * m.v_head_dim, H, bias=config.attention_out_bias)
        self._absorbed: tuple[torch.Tensor, torch.Tensor] | None = None

    def absorbed(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W_UK (heads, nope, rank), W_UV^T (heads, rank, v)), cut from ``kv_b_proj`` once."""
        if self._absorbed is None or self._absorbed[0].dtype != self.kv_b_proj.weight.dtype:
            m = self.mla
            w = self.kv_b_proj.weight.detach().view(self.heads, m.qk_nope_head_dim + m.v_head_dim, m.kv_lora_rank)
            self._absorbed = (w[:, :m.qk_nope_head_dim].contiguous(),
                              w[:, m.qk_nope_head_dim:].transpose(1, 2).contiguous())
        return self._absorbed

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, cache) -> torch.Tensor:
        batch, seq, _ = x.shape
        m = self.mla
        q = self.q_proj(x) if m.q_lora_rank is None else self.q_b_proj(self.q_a_norm(self.q_a_proj(x)))
        q = q.view(batch, seq, self.heads, -1).transpose(1, 2)
        q_nope, q_pe = q.split([m.qk_nope_head_dim, m.qk_rope_head_dim], dim=-1)
        c_kv, k_pe = self.kv_a_proj(x).split([m.kv_lora_rank, m.qk_rope_head_dim], dim=-1)
        c_kv = self.kv_a_norm(c_kv).unsqueeze(1)  # (batch, 1, seq, rank): one latent "head"
        k_pe = k_pe.unsqueeze(1)
        if rope is not None:
            q_pe, k_pe = apply_rope(q_pe, *rope), apply_rope(k_pe, *rope)
        if self.cache_expanded or cache is None or _empty(cache, self.layer):
            out = self._expanded(q_nope, q_pe, c_kv, k_pe, cache)
        else:
            out = self._absorbed_attention(q_nope, q_pe, torch.cat([c_kv, k_pe], dim=-1), cache)
        return self.out(out.transpose(1, 2).reshape(batch, seq, -1))

    def _expanded(self, q_nope, q_pe, c_kv, k_pe, cache) -> torch.Tensor:
        """Up-project the new latents to per-head K/V and attend over them (the prompt's own tokens)."""
        m = self.mla
        batch, _, seq, _ = q_nope.shape
        kv = self.kv_b_proj(c_kv[:, 0]).view(batch, seq, self.heads, -1).transpose(1, 2)
        k_nope, v = kv.split([m.qk_nope_head_dim, m.v_head_dim], dim=-1)
        k = torch.cat([k_nope, k_pe.expand(-1, self.heads, -1, -1)], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1) * (m.softmax_scale * k.shape[-1] ** 0.5)
        if self.cache_expanded and cache is not None:
            return cache.attend(self.layer, q, k, v)
        if cache is not None:  # an empty cache: keep the latents for the tokens to come
            latent = torch.cat([c_kv, k_pe], dim=-1)
            cache.update(self.layer, latent, latent[..., :m.kv_lora_rank])
        return attention(q, k, v)

    def _absorbed_attention(self, q_nope, q_pe, latent, cache) -> torch.Tensor:
        """Multi-query attention over the cached latents, the up-projections folded into q and the output."""
        m = self.mla
        w_uk, w_uv_t = self.absorbed()
        q = torch.cat([torch.matmul(q_nope, w_uk), q_pe], dim=-1) * (m.softmax_scale * m.latent_dim ** 0.5)
        out = cache.attend(self.layer, q, latent, latent[..., :m.kv_lora_rank])  # (batch, heads, seq, rank)
        return torch.matmul(out, w_uv_t)


def _empty(cache, layer: int) -> bool:
    """A cache that can store without attending and holds nothing yet for this layer (the contract's
    ``stores_unattended``): the prompt attends only to itself, so the expanded form runs.  The engine's
    pools, and a cache of one's own without the member, go absorbed."""
    stores_unattended = getattr(cache, "stores_unattended", None)
    return stores_unattended is not None and stores_unattended(layer)
