"""A decoder-only transformer, read top to bottom: GPT-2, Llama and DeepSeek in one file.

GPT-2: learned positions, LayerNorm, GELU (tanh), fused QKV with bias, tied head.
Llama: RoPE, RMSNorm, SwiGLU, grouped-query attention (Qwen2 adds a QKV bias;
Llama's attention_bias / mlp_bias add biases to the attention / MLP projections).
DeepSeek-V2/V3: Llama's block with latent attention (mla.py) and, past the first
dense layers, a mixture of experts (moe.py), chosen by two small factories.

The model runs with or without a cache.  A cache is any object with
``attend(layer, q, k, v) -> out``: it stores the new keys/values and returns
attention of q over everything stored, so the same model drives the
contiguous cache, the paged cache of the engine, and the uncached baseline.
Q/K/V and gate/up projections are fused into one matmul each at load time:
on a CPU that decodes by streaming weights, fewer, larger matmuls and fewer
Python-level ops per layer are what make a token fast.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import glue
from .activations import activation
from .attention import attention
from .config import ModelConfig
from .linear import Linear, watched
from .mla import LatentAttention
from .moe import MoE
from .qlinear import QuantEmbedding, QuantLinear
from .qweight import QuantWeight
from .rope import Rope, rope_tables


class AttentionCache(Protocol):
    """What the model asks of a cache (caches/base.py writes the full contracts down).

    Required: ``attend(layer, q, k, v, window=None)``.  Read when present: ``len(cache)`` (the next
    position), ``rotates_keys`` (True: the cache applies RoPE, the model passes q and k unrotated) and
    ``stores_unattended(layer)`` (latent attention's expanded prompt form, model/mla.py).  A cache of one's
    own may implement ``attend`` alone.
    """

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor: ...


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        q_size, kv_size = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
        self.split = (q_size, kv_size, kv_size)
        self.qk_size = q_size + kv_size
        self.qkv = Linear(config.hidden_size, q_size + 2 * kv_size, bias=config.attention_bias)
        self.out = Linear(q_size, config.hidden_size, bias=bool(config.attention_out_bias))
        # Mistral-style sliding window; only passed to caches when set, so simple caches need not know it
        window = config.sliding_window
        self.window = window if window and window < config.max_positions else None
        self.cache_kwargs = {"window": self.window} if self.window else {}

    def forward(self, x: torch.Tensor, rope: Rope | None, cache: AttentionCache | None) -> torch.Tensor:
        batch, seq, _ = x.shape
        heads, kv_heads, dim = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.qkv(x)
        qk = qkv[..., :self.qk_size].view(batch, seq, heads + kv_heads, dim)
        if rope is not None and glue.serves(qkv) and qkv.is_contiguous():  # the tables are in x's dtype already
            glue.rope_in_place(qkv, heads + kv_heads, dim, rope.cos_heads_last, rope.sin_heads_last)
        elif rope is not None:  # queries and keys rotated in one go
            qk = rope.rotate_heads_last(qk)
        q, k = qk[:, :, :heads].transpose(1, 2), qk[:, :, heads:].transpose(1, 2)
        v = qkv[..., self.qk_size:].view(batch, seq, kv_heads, dim).transpose(1, 2)
        if cache is None:
            out = attention(q, k, v, window=self.window)
        else:
            out = cache.attend(self.layer, q, k, v, **self.cache_kwargs)
        return self.out(out.transpose(1, 2).reshape(batch, seq, -1))

    __call__ = forward  # called once per layer per token: skip nn.Module's hook machinery (see Linear)


class MLP(nn.Module):
    """GPT-2: fc -> act (GELU, tanh) -> proj.  Llama: down(act(gate) * up) (act: SiLU), gate/up fused."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gated = config.arch == "llama"
        self.act = activation(config.hidden_act)
        self.silu_gated = self.gated and self.act is F.silu  # glue.silu_mul's case
        width = 2 * config.intermediate_size if self.gated else config.intermediate_size
        self.up = Linear(config.hidden_size, width, bias=bool(config.mlp_bias))
        self.down = Linear(config.intermediate_size, config.hidden_size, bias=bool(config.mlp_bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)
        if self.silu_gated and glue.serves(h):
            return self.down(glue.silu_mul(h))
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            return self.down(self.act(gate) * up)
        return self.down(self.act(h))

    __call__ = forward


def make_attention(config: ModelConfig, layer: int) -> nn.Module:
    """Multi-head / grouped-query attention, or DeepSeek's multi-head latent attention."""
    return LatentAttention(config, layer) if config.mla else Attention(config, layer)


def make_mlp(config: ModelConfig, layer: int) -> nn.Module:
    """The dense MLP, or (DeepSeek, from layer ``first_dense_layers`` on) a mixture of experts."""
    return MoE(config) if config.moe and layer >= config.moe.first_dense_layers else MLP(config)


class RMSNorm(nn.RMSNorm):
    __call__ = nn.RMSNorm.forward  # twice per layer per token: skip nn.Module's hook machinery (see Linear)

    def compiled(self, x: torch.Tensor) -> bool:
        """True when :meth:`add_and_norm` runs compiled (glue.c) for ``x``."""
        return self.weight is not None and self.weight.dtype == x.dtype and glue.serves(x)

    def add_and_norm(self, x: torch.Tensor, delta: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(h, norm(h))`` with ``h = x + delta``, in one compiled call (callers check :meth:`compiled`)."""
        eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps
        return glue.rmsnorm(x, self.weight, eps, delta)


class LayerNorm(nn.LayerNorm):
    __call__ = nn.LayerNorm.forward


def make_norm(config: ModelConfig) -> nn.Module:
    if config.arch == "gpt2":
        return LayerNorm(config.hidden_size, eps=config.norm_eps)
    return RMSNorm(config.hidden_size, eps=config.norm_eps)


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.attn_norm = make_norm(config)
        self.attn = make_attention(config, layer)
        self.mlp_norm = make_norm(config)
        self.mlp = make_mlp(config, layer)
        self.rms_norms = isinstance(self.attn_norm, RMSNorm)  # both norms are: they can run compiled (glue.c)

    def forward(self, x: torch.Tensor, rope, cache: AttentionCache | None) -> torch.Tensor:
        if self.rms_norms and self.attn_norm.compiled(x):  # the two norms' weights share the model's dtype
            _, normed = self.attn_norm.add_and_norm(x)  # the residual adds fused into the norms after them
            x, normed = self.mlp_norm.add_and_norm(x, self.attn(normed, rope, cache))
            return x + self.mlp(normed)
        x = x + self.attn(self.attn_norm(x), rope, cache)
        return x + self.mlp(self.mlp_norm(x))

    __call__ = forward


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.pos_embed = nn.Embedding(config.max_positions, config.hidden_size) if config.arch == "gpt2" else None
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_layers))
        self.norm = make_norm(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:  # the head reads the embedding table: watch it as the head's own weight
            self.embed.weight = watched(self.embed.weight)
            self.lm_head.weight = self.embed.weight
        if config.arch == "llama":
            cos, sin = rope_tables(config)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.tokenizer = None  # set by load_model

    def watch_weights(self) -> None:
        """Re-wrap every linear weight as a fresh WatchedParameter (after ``to_empty``/``to``, which make plain
        Parameters or mark them aliased).  Only for a model nobody else holds weight references to yet."""
        if isinstance(self.embed, QuantEmbedding):  # its blocks are no Parameter: nothing to watch or tie
            table = None
        else:
            table = self.embed.weight
        for module in self.modules():
            if isinstance(module, Linear) and module.weight is not table:
                module.weight = watched(module.weight, fresh=True)
        if self.config.tie_word_embeddings and table is not None:
            self.embed.weight = watched(self.embed.weight, fresh=True)
            self.lm_head.weight = self.embed.weight

    def pack_weights(self) -> None:
        """Blocked oneDNN copies of every linear weight: faster decode, twice the weight memory (Linear)."""
        for module in self.modules():
            if isinstance(module, Linear):
                module.pack()

    def hold_quantized(self, weights: dict[str, QuantWeight], float_activations: bool = False) -> None:
        """Swap the modules named in ``weights`` ("embed", "lm_head", "layers.0.attn.qkv", ...) for ones that
        keep their weight in its GGUF format (qlinear.py); a tied head shares the embedding's blocks."""
        for name, weight in weights.items():
            if name == "embed":
                self.embed = QuantEmbedding(weight)
                continue
            parent, _, leaf = name.rpartition(".")
            owner = self.get_submodule(parent) if parent else self
            old = getattr(owner, leaf)
            setattr(owner, leaf, QuantLinear(weight, bias=old.bias is not None, float_activations=float_activations))
        if self.config.tie_word_embeddings and isinstance(self.embed, QuantEmbedding):
            self.lm_head = QuantLinear(self.embed.qweight, float_activations=float_activations)

    def set_float_activations(self, on: bool) -> None:
        """Quantized weights: multiply float32 activations (exact against the dequantized model) instead of the
        8-bit activations of the integer kernel."""
        for module in self.modules():
            if isinstance(module, QuantLinear):
                module.float_activations = bool(on)

    def weight_formats(self) -> dict[str, int]:
        """Bytes of matrix weights per format ("float32", "bfloat16", "Q8_0", ...), a tied matrix counted once."""
        seen, sizes = set(), {}
        for module in self.modules():
            if isinstance(module, (QuantLinear, QuantEmbedding)):
                key, fmt, size = id(module.qweight), module.qweight.fmt, module.qweight.nbytes
            elif isinstance(module, (nn.Linear, nn.Embedding)):
                weight = module.weight
                key, fmt, size = id(weight), str(weight.dtype).removeprefix("torch."), weight.nbytes
            else:
                continue
            if key not in seen:
                seen.add(key)
                sizes[fmt] = sizes.get(fmt, 0) + size
        return sizes

    @property
    def dtype(self) -> torch.dtype:
        """The dtype activations are computed in (float32 for weights held in a GGUF format)."""
        return self.norm.weight.dtype

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: AttentionCache | None = None,
        logits_index: torch.Tensor | int | slice | None = None,
    ) -> torch.Tensor:
        """Logits for input_ids (batch, seq).

        positions: (seq,) or (batch, seq) absolute positions; defaults to the
        cache length onwards (or 0.. without a cache).  logits_index selects
        which positions of the flattened (batch*seq) hidden states reach the
        LM head (e.g. -1: only the last token), saving the vocabulary matmul
        for prompt tokens whose logits nobody reads.
        """
        batch, seq = input_ids.shape
        if positions is None:
            start = len(cache) if cache is not None and hasattr(cache, "__len__") else 0
            positions = torch.arange(start, start + seq)
        x = self.embed(input_ids)
        rope = None
        if self.pos_embed is not None:
            x = x + self.pos_embed(positions)
        elif getattr(cache, "rotates_keys", False):
            rope = None  # positions past the trained context are fine: the cache applies its own (window.py)
        else:
            cos, sin = self.rope_cos[positions], self.rope_sin[positions]
            if cos.dim() == 3:  # (batch, seq, d) -> broadcast over heads
                cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
            rope = Rope(cos.to(x.dtype), sin.to(x.dtype))
        for block in self.layers:
            x = block(x, rope, cache)
        if logits_index is not None:
            x = x.reshape(batch * seq, -1)[logits_index]
        return self.lm_head(self.norm(x))
