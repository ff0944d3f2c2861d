"""A contiguous KV cache stored in 8 or 4 bits per value, group-wise, with full-precision sinks and residual.

Every decode step reads the whole cache, so at long context the cache, not the
weights, is what decoding streams; stored in int8/int4 it is smaller *and*,
since attention reads the codes directly (kernels.py / quant_ops.py), faster.

Layout per layer: the first ``sinks`` positions and the most recent tokens
live in a full-precision buffer; every other token is stored quantized
(quant_ops.py describes the format).  A token is quantized **once**, when it
leaves the residual, in blocks of ``g`` tokens (the key group: ``group``
capped at head_dim for per-token groups, ``group`` tokens for KIVI keys;
values are grouped along ``min(group, head_dim)`` channels): before attending at
length ``L``, tokens ``[sinks, sinks + qcount(L))`` are quantized, with
``qcount(L) = floor(max(0, L - sinks - residual) / g) * g``.  So the
residual holds between ``residual`` and ``residual + g - 1`` tokens.

A multi-token forward (prefill, a speculative verify pass) gives every query
exactly the view a token-by-token decode would have had: query ``i`` reads key
``j`` quantized iff ``j`` would already have been quantized at length ``i``.
Chunking therefore never changes results, and eval can prefill whole windows.

A sliding-window model (Mistral) past its window attends to the stored forms of its last ``window``
positions (exact for decoding; a multi-token forward there sees its own tokens in full precision).

``crop`` keeps every kept token's stored form as it is (quantized tokens are
never re-quantized or expanded back); ``select`` reorders rows exactly.
With ``rotate=1`` keys and queries are multiplied by an orthonormal Hadamard
matrix (q.k unchanged) so outlier channels are spread before int4 rounding.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..checks import check_int
from ..model.attention import ATTENTION_DTYPE, attention, finite_attention, merge_partials, softmax_partial
from ..runtime import check_fits
from . import kernels
from .base import Cache, Option
from .contiguous import batch_index_tensor, check_kv, check_layer
from .prefill_view import banded_view_attention, prefill_attention, view_masks
from .quant_ops import (
    TILE,
    QuantFormat,
    dequantize,
    dequantize_rows,
    hadamard,
    quantize,
    quantized_partial,
)
from .quant_store import QuantizedStore


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """What a quantized cache computes and keeps its full-precision rows in: float32 for half-precision models
    (softmax partials and dequantized codes in bfloat16 lose digits, and both of a model's paths -- ``generate``
    and the engine's pool -- then agree as they do in float32), the model's dtype otherwise."""
    return ATTENTION_DTYPE.get(dtype, dtype)


class QuantizedKVCache(Cache):
    lossless = False
    options = {
        "bits": Option(int, 8, "bits per stored value: 8 or 4"),
        "group": Option(int, 32, "values per scale: channels of a token, at most head_dim (keys=channel: tokens "
                                  "of a channel, a multiple of 16)", minimum=1),
        "value_group": Option(int, None, "channels per value scale (default: group, at most head_dim)", minimum=1),
        "residual": Option(int, 128, "most recent tokens kept in full precision", minimum=0),
        "block": Option(int, None, "tokens quantized together once they leave the residual (default: the key "
                        "group; keys=channel: a multiple of group); the engine quantizes its blocks", minimum=1),
        "sinks": Option(int, 0, "first tokens kept in full precision for ever", minimum=0),
        "keys": Option(str, None, "key groups: token (per-token channel groups) or channel (KIVI); default: "
                       "token for int8, channel for int4 (measured best, docs/quantized-cache.md)",
                       choices=("token", "channel")),
        "symmetric": Option(bool, False, "symmetric codes (scale only) instead of min/max"),
        "rotate": Option(bool, False, "Hadamard-rotate queries and keys (head_dim a power of two)"),
        "kernel": Option(bool, True, "decode with the compiled kernel when it builds"),
    }

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, batch: int = 1, capacity: int = 256,
                 dtype: torch.dtype = torch.float32, bits: int = 8, group: int = 32, residual: int = 128,
                 sinks: int = 0, keys: str | None = None, symmetric: bool = False, rotate: bool = False,
                 kernel: bool = True, check_finite: bool = False, value_group: int | None = None,
                 block: int | None = None):
        num_layers, num_kv_heads, head_dim, batch, capacity, group = (
            check_int(value, name, minimum=1) for name, value in (
                ("num_layers", num_layers), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim),
                ("batch", batch), ("capacity", capacity), ("group", group)))
        residual, sinks = check_int(residual, "residual", minimum=0), check_int(sinks, "sinks", minimum=0)
        if bits not in (4, 8):
            raise ValueError(f"bits must be 8 or 4, got {bits!r}")
        channels = min(group, head_dim)  # a small model's head_dim caps the channel groups
        value_channels = min(group if value_group is None else check_int(value_group, "value_group", minimum=1),
                             head_dim)
        if head_dim % value_channels:
            raise ValueError(f"value group {value_channels} must divide head_dim {head_dim} (values are grouped "
                             "along channels)")
        if keys is None:
            keys = "channel" if bits == 4 and group % TILE == 0 else "token"
        if keys not in ("token", "channel"):
            raise ValueError(f"keys must be 'token' or 'channel', got {keys!r}")
        if keys == "channel" and group % TILE:
            raise ValueError(f"keys=channel groups whole tiles of {TILE} tokens: group must be a multiple of {TILE}, "
                             f"got {group}")
        if keys == "token" and head_dim % channels:
            raise ValueError(f"group {group} must divide head_dim {head_dim} (per-token keys are grouped along "
                             "channels)")
        key_group = group if keys == "channel" else channels
        block = key_group if block is None else check_int(block, "block", minimum=1)
        if keys == "channel" and block % group:
            raise ValueError(f"block {block} must be a multiple of group {group}: keys=channel quantizes whole "
                             "groups of tokens")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
        self.compute_dtype = compute_dtype(dtype)
        self.rotation = hadamard(head_dim, self.compute_dtype) if rotate else None
        self.key_fmt = QuantFormat(bits, key_group, bool(symmetric), per_channel=keys == "channel")
        self.value_fmt = QuantFormat(bits, value_channels, bool(symmetric))
        self.residual, self.sinks, self.dtype, self.check_finite = residual, sinks, dtype, check_finite
        self.block = block
        self.use_kernel = bool(kernel) and kernels.fits(head_dim, self.key_fmt, self.value_fmt)
        self._shape = (num_layers, num_kv_heads, head_dim)
        per_token = 2 * num_layers * batch * num_kv_heads * head_dim * (bits / 8 + 4 / group)
        check_fits(int(per_token * capacity), f"a quantized KV cache of {capacity:,} positions x batch {batch}")
        self.fp_k = torch.zeros(num_layers, batch, num_kv_heads, min(capacity, sinks + residual + block), head_dim,
                                dtype=self.compute_dtype)
        self.fp_v = torch.zeros_like(self.fp_k)
        self.store = QuantizedStore(num_layers, batch, num_kv_heads, head_dim, self.key_fmt, self.value_fmt, capacity)
        self.lengths = [0] * num_layers  # positions per layer
        self.qcounts = [0] * num_layers  # quantized tokens per layer (positions sinks .. sinks + qcount)

    @classmethod
    def for_model(cls, model, batch: int = 1, capacity: int | None = None, **options) -> QuantizedKVCache:
        c = model.config
        if c.mla is not None:
            raise ValueError("the quantized caches do not store latent (MLA) attention's [c_kv | k_pe] yet: "
                             "use the full-precision cache ('auto')")
        return cls(c.num_layers, c.num_kv_heads, c.head_dim, batch=batch,
                   capacity=c.max_positions if capacity is None else capacity, dtype=model.dtype, **options)

    # --- shape and size ----------------------------------------------------
    num_layers = property(lambda self: self._shape[0])
    batch = property(lambda self: self.fp_k.shape[1])
    num_kv_heads = property(lambda self: self._shape[1])
    head_dim = property(lambda self: self._shape[2])
    device = torch.device("cpu")

    def __len__(self) -> int:
        return self.lengths[-1]

    @property
    def capacity(self) -> int:
        """Tokens the quantized store holds before it grows (doubling, like the contiguous cache)."""
        return self.store.capacity

    @property
    def nbytes(self) -> int:
        return self.fp_k.nbytes + self.fp_v.nbytes + self.store.nbytes

    @property
    def used_bytes(self) -> int:
        """Bytes holding tokens: codes and scales of quantized tokens, full-precision sinks and residual."""
        fp_token = 2 * self.batch * self.num_kv_heads * self.head_dim * self.fp_k.element_size()
        q_token = self.store.bytes_per_token // self.num_layers
        return sum(q * q_token + (n - q) * fp_token for n, q in zip(self.lengths, self.qcounts))

    def _qcount(self, length: int) -> int:
        return max(0, length - self.sinks - self.residual) // self.block * self.block

    # --- attention ---------------------------------------------------------
    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               window: int | None = None) -> torch.Tensor:
        """Store k/v, then causal attention of q over every held position (quantized ones read in place)."""
        layer = self._layer(layer)
        check_kv(self, layer, k, v)
        n, start = k.shape[2], self.lengths[layer]
        q, k, v = (t.to(self.compute_dtype) for t in (q, k, v))  # bf16/fp16 models: computed in float32
        original_q = q
        if self.rotation is not None:
            q, k = q @ self.rotation, k @ self.rotation
        check_range(k, v)
        qc, fp_end = self._store_new(layer, start, k, v)
        if window is not None and start + n > window:  # Mistral past its window: the last `window` stored forms
            self.lengths[layer] = start + n
            return attention(original_q, *self._stored_forms(layer), window=window).to(self.dtype)
        out = self._attend_stored(layer, q, start, n, qc, fp_end)
        if torch.isfinite(out).all():
            return out.to(self.dtype)
        keys, values = self._stored_forms(layer)  # huge inputs overflowed a fast path: the stored forms, exactly
        return finite_attention(original_q, keys, values).to(self.dtype)

    def _attend_stored(self, layer: int, q: torch.Tensor, start: int, n: int, qc: int, fp_end: int) -> torch.Tensor:
        batch, heads, _, dim = q.shape
        kv_heads = self.num_kv_heads
        qg = (q * dim ** -0.5).reshape(batch, kv_heads, heads // kv_heads * n, dim)
        self.lengths[layer] = start + n
        if n == 1 and self.use_kernel and kernels.usable(qg):  # one call: stored codes and full-precision part together
            out = kernels.quant_decode(qg.contiguous(), *self.store.layer(layer), qc, self.key_fmt.bits,
                                       self.key_fmt.group, self.value_fmt.group, self.key_fmt.per_channel,
                                       self.fp_k[layer], self.fp_v[layer], fp_end)
            return out.view(batch, heads, 1, dim)
        if n > 1 and self._pool_layout():
            return self._prefill_view(layer, q, start, n, qc, fp_end)
        if n > 1:
            return self._banded_prefill(layer, q, start, n, qc, fp_end)
        parts = [] if qc == 0 else [self._stored_partial(layer, qg, qc)]
        parts.append(softmax_partial(torch.matmul(qg, self.fp_k[layer, :, :, :fp_end].transpose(-1, -2)),
                                     self.fp_v[layer, :, :, :fp_end]))
        return merge_partials(parts).reshape(batch, heads, n, dim).to(q.dtype)


    def _pool_layout(self) -> bool:
        """The engine pool's layout (no residual, no sinks, one sequence): then a prefill runs the pool's own
        prefill attention (prefill_view.py) on the same inputs, so both sum in the same order -- in half
        precision another order can differ by an ulp, which an int4 code can turn into another token."""
        return self.residual == 0 and self.sinks == 0 and self.batch == 1

    def _prefill_view(self, layer: int, q: torch.Tensor, start: int, n: int, qc: int, fp_end: int) -> torch.Tensor:
        """The chunk's queries over blocks before their own dequantized (stored ones, then those this pass
        fills) and their own block in full precision: what the engine's pool computes for it."""
        bs = self.block
        quantized = (start + n - 1) // bs * bs
        dq_k, dq_v = self._dequantized(layer, qc, quantized, q.dtype)
        masks = view_masks(start, n, bs, quantized, q.dtype)
        self.lengths[layer] = start + n
        return prefill_attention(q, dq_k, dq_v, self.fp_k[layer, :, :, :fp_end], self.fp_v[layer, :, :, :fp_end],
                                 start, bs, masks)

    def _banded_prefill(self, layer: int, q: torch.Tensor, start: int, n: int, qc: int, fp_end: int) -> torch.Tensor:
        """A multi-token forward with sinks or a residual: query ``p`` reads the tokens a decode at ``p`` had
        quantized dequantized, the rest in full precision (prefill_view.banded_view_attention)."""
        q_pos = torch.arange(start, start + n)
        seen = torch.clamp(q_pos - self.sinks - self.residual, min=0) // self.block * self.block
        seen = torch.clamp(seen, min=qc)
        dq_k, dq_v = self._dequantized(layer, qc, int(seen[-1]), q.dtype)
        fp_pos = torch.arange(fp_end)
        fp_pos = torch.where(fp_pos < self.sinks, fp_pos, fp_pos + qc)
        return banded_view_attention(q, q_pos, seen, dq_k, dq_v, self.fp_k[layer, :, :, :fp_end],
                                     self.fp_v[layer, :, :, :fp_end], fp_pos, self.sinks)

    def _dequantized(self, layer: int, qc: int, upto: int, dtype: torch.dtype):
        """Quantized-region tokens [0, upto) dequantized, (keys, values) or (None, None): the ``qc`` stored
        ones, then those this pass quantizes from the buffer (codes computed, not yet stored)."""
        if not upto:
            return None, None
        keys, values = [], []
        if qc:
            k_q, v_q = dequantize_rows(self.store.rows(layer, qc), self.key_fmt, self.value_fmt, dtype)
            keys.append(k_q)
            values.append(v_q)
        if upto > qc:
            codes = self._quantize_range(layer, qc, upto)
            keys.append(dequantize(codes["kc"], codes["ks"], codes["ko"], self.key_fmt, dtype))
            values.append(dequantize(codes["vc"], codes["vs"], codes["vo"], self.value_fmt, dtype))
        return torch.cat(keys, 2), torch.cat(values, 2)

    def _store_new(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[int, int]:
        """Quantize what a decode at ``start`` would have, write k/v (rotated) to the buffer: (qcount, buffer end)."""
        self._flush(layer, max(self.qcounts[layer], self._qcount(start)))  # lazy: what a decode at `start` sees
        qc = self.qcounts[layer]
        fp_end = start + k.shape[2] - qc
        self._reserve_fp(fp_end)
        self.fp_k[layer, :, :, start - qc:fp_end] = k
        self.fp_v[layer, :, :, start - qc:fp_end] = v
        return qc, fp_end

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k/v without attending (for callers that attend themselves: the transformers adapter)."""
        layer = self._layer(layer)
        check_kv(self, layer, k, v)
        start = self.lengths[layer]
        k, v = k.to(self.compute_dtype), v.to(self.compute_dtype)
        k = k if self.rotation is None else k @ self.rotation
        check_range(k, v)
        self._store_new(layer, start, k, v)
        self.lengths[layer] = start + k.shape[2]

    def materialize(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Every held position of ``layer`` as full tensors in the cache's dtype (quantized ones dequantized,
        keys un-rotated).

        This is the one place a whole layer is expanded: transformers' attention needs tensors; kvcache's
        own attention reads them only on its exact fallbacks.
        """
        keys, values = self._stored_forms(self._layer(layer))
        return keys.to(self.dtype), values.to(self.dtype)

    def _stored_forms(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """materialize, in the compute dtype."""
        n, qc = self.lengths[layer], self.qcounts[layer]
        sinks = min(self.sinks, n)
        rows = self.store.rows(layer, qc)
        keys, values = [self.fp_k[layer, :, :, :sinks]], [self.fp_v[layer, :, :, :sinks]]
        if qc:
            k_q, v_q = dequantize_rows(rows, self.key_fmt, self.value_fmt, self.compute_dtype)
            keys.append(k_q)
            values.append(v_q)
        keys.append(self.fp_k[layer, :, :, sinks:n - qc])
        values.append(self.fp_v[layer, :, :, sinks:n - qc])
        k, v = torch.cat(keys, 2), torch.cat(values, 2)
        return (k if self.rotation is None else k @ self.rotation.T), v

    def _stored_partial(self, layer: int, qg: torch.Tensor, qc: int):
        return quantized_partial(qg, self.store.rows(layer, qc), self.key_fmt, self.value_fmt)

    # --- quantizing tokens that leave the residual ---------------------------
    def _quantize_range(self, layer: int, qc: int, target: int) -> dict[str, torch.Tensor]:
        """Codes of quantized-region tokens [qc, target) from the buffer, without storing them."""
        first = self.sinks  # their buffer index starts right after the sinks
        keys = self.fp_k[layer, :, :, first:first + target - qc]
        values = self.fp_v[layer, :, :, first:first + target - qc]
        codes = dict(zip(("vc", "vs", "vo"), quantize(values, self.value_fmt)))
        g = self.key_fmt.group
        if not self.key_fmt.per_channel or qc % g == 0:
            codes.update(zip(("kc", "ks", "ko"), quantize(keys, self.key_fmt)))
            return codes
        # a cropped, partly kept block: refill it against its stored scales, then fresh blocks
        head = -qc % g
        block = qc // g
        scale, offset = self.store.key_block_scales(layer, block)
        fill = torch.round((keys[:, :, :head].float() - offset.float()[:, :, None]) / scale.float()[:, :, None])
        fill = fill.clamp_(0, self.key_fmt.levels).to(torch.uint8)
        if self.key_fmt.bits == 4:
            fill = fill[..., 0::2] | (fill[..., 1::2] << 4)
        rest = quantize(keys[:, :, head:], self.key_fmt)
        codes["kc"] = torch.cat((fill, rest[0]), dim=2)
        codes["ks"] = torch.cat((scale[:, :, None], rest[1]), dim=2)
        codes["ko"] = torch.cat((offset[:, :, None], rest[2]), dim=2)
        return codes

    def _flush(self, layer: int, target: int) -> None:
        qc = self.qcounts[layer]
        if target <= qc:
            return
        self.store.write(layer, qc, target, self._quantize_range(layer, qc, target))
        first, end = self.sinks, self.lengths[layer] - qc
        for buf in (self.fp_k, self.fp_v):  # the residual moves down over the tokens just stored
            buf[layer, :, :, first:end - (target - qc)] = buf[layer, :, :, first + target - qc:end].clone()
        self.qcounts[layer] = target

    def _reserve_fp(self, needed: int) -> None:
        if needed > self.fp_k.shape[3]:
            size = max(needed, 2 * self.fp_k.shape[3])
            grown = [torch.cat((b, b.new_zeros(*b.shape[:3], size - b.shape[3], b.shape[4])), 3)
                     for b in (self.fp_k, self.fp_v)]
            self.fp_k, self.fp_v = grown

    # --- edits ---------------------------------------------------------------
    def _layer(self, layer: int) -> int:
        return check_layer(layer, self.num_layers)

    def crop(self, length: int) -> None:
        """Roll back to the first ``length`` positions; every kept token keeps its stored form."""
        length = check_int(length, "length")
        if not 0 <= length <= len(self):
            raise ValueError(f"cannot crop to {length}: the cache holds {len(self)} positions")
        for layer, (n, qc) in enumerate(zip(self.lengths, self.qcounts)):
            new_n = min(n, length)
            new_qc = min(qc, max(0, new_n - self.sinks))  # below qc only when the whole residual is dropped
            self.lengths[layer], self.qcounts[layer] = new_n, new_qc

    def select(self, batch_indices: Sequence[int] | torch.Tensor) -> None:
        idx = batch_index_tensor(batch_indices, self.batch)
        fp_k, fp_v = self.fp_k.index_select(1, idx), self.fp_v.index_select(1, idx)
        self.store.select(idx)
        self.fp_k, self.fp_v = fp_k, fp_v

    reorder = select

    def reset(self) -> None:
        self.lengths = [0] * self.num_layers
        self.qcounts = [0] * self.num_layers


HALF_MAX = 65504.0


def check_range(k: torch.Tensor, v: torch.Tensor) -> None:
    """Codes are scaled by float16 numbers: refuse, before storing, values beyond float16's range."""
    if max(k.abs().max().item(), v.abs().max().item()) > HALF_MAX:
        raise ValueError(f"keys/values beyond float16 range (|x| > {HALF_MAX:g}, after rotation) cannot be stored by "
                         "the quantized cache, whose scales are float16; use a full-precision cache")
