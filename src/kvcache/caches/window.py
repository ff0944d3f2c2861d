"""A bounded cache: the last ``size`` tokens in a ring buffer, plus the first ``sinks`` tokens kept forever.

StreamingLLM (Xiao et al., 2023) showed that keeping a few first tokens ("attention sinks") beside a recent
window keeps perplexity stable over very long streams, where a plain window collapses once the first
tokens leave it.  Memory and time per token stay flat, however long the stream.

Storage per layer: ``sinks`` slots, then a ring of ``size + margin`` slots where token ``j`` (``j >= sinks``)
lives in slot ``(j - sinks) % ring``.  Eviction is O(1): a slot is simply written again.  The ``margin``
tokens that left the window are still held, so ``crop`` can roll back that far (speculative decoding)
even after the ring has wrapped.

Query ``t`` attends to the sinks and to the keys ``j`` with ``t - size < j <= t``.  Two position
conventions:

* ``positions=cache`` (StreamingLLM; the default for RoPE models): the model hands over keys and queries
  before RoPE, and ``q.k`` sees each key at its rank inside the cache: a sink at its index, the query at
  its rank among the kept keys, window keys at their true distance from it.  RoPE scores depend only on
  position differences, so the cache rotates each key once, when it is stored, at its absolute position
  (angles in float64: no table to run out of), and each query twice: at its absolute position against
  the window, at its rank against the sinks.  No key is ever rotated twice, and a stream runs past the
  model's trained context.
* ``positions=absolute`` (Mistral-style): the model rotates keys at their absolute positions before they
  are stored, as with every other cache; valid only within the trained context.

Attention equals dense attention over exactly the kept keys, with those positions (tests/caches/test_window.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..checks import check_int, is_int
from ..model.attention import attention, grouped_scores, merge_partials, softmax_partial
from ..model.rope import apply_rope, rope_frequencies
from ..runtime import check_fits
from .base import Cache, Option
from .contiguous import batch_index_tensor, check_kv, check_layer


class WindowKVCache(Cache):
    lossless = False  # tokens outside the window are forgotten
    options = {
        "size": Option(int, None, "recent tokens every query attends to (the window, itself included; default: "
                       "1024, at most half the model's context)", minimum=1),
        "sinks": Option(int, 0, "first tokens kept forever (StreamingLLM's attention sinks)", minimum=0),
        "margin": Option(int, 16, "evicted tokens still held, so crop() can roll back this far", minimum=0),
        "positions": Option(str, None, "cache: rotate keys by their rank in the cache (streams past the model's "
                            "context; default for RoPE models); absolute: the model's own positions",
                            choices=("cache", "absolute")),
    }

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, size: int, sinks: int = 0,
                 margin: int = 16, batch: int = 1, dtype: torch.dtype = torch.float32,
                 rope: tuple[torch.Tensor, float] | None = None):
        for name, value, low in (("num_layers", num_layers, 1), ("num_kv_heads", num_kv_heads, 1),
                                 ("head_dim", head_dim, 1), ("size", size, 1), ("sinks", sinks, 0),
                                 ("margin", margin, 0), ("batch", batch, 1)):
            check_int(value, name, minimum=low)
        self.size, self.sinks, self.ring = size, sinks, size + margin
        shape = (num_layers, batch, num_kv_heads, sinks + self.ring, head_dim)
        check_fits(2 * math.prod(shape) * torch.empty((), dtype=dtype).element_size(),
                   f"a window cache of {sinks + self.ring:,} slots x batch {batch}")
        self.k = torch.zeros(shape, dtype=dtype)
        self.v = torch.zeros(shape, dtype=dtype)
        self.lengths = [0] * num_layers  # tokens seen per layer: the absolute position of the next one
        self.rope = rope  # (inverse frequencies, cos/sin scale): keys are rotated here (positions=cache)
        self.check_finite = True
        self._step: tuple[int, torch.Tensor] | None = None  # (length, ring mask) shared by a decode step's layers
        self._trig: dict = {}  # recent RoPE cos/sin by positions (contiguous ranges are keyed by their ends)

    @classmethod
    def for_model(cls, model, batch: int = 1, capacity: int | None = None, size: int | None = None, sinks: int = 0,
                  margin: int = 16, positions: str | None = None) -> "WindowKVCache":
        """``capacity`` is ignored: the cache is bounded by ``sinks + size + margin`` tokens."""
        c = model.config
        size = size if size is not None else default_size(c)
        if c.mla is not None:
            raise ValueError("the window cache does not store latent (MLA) attention's [c_kv | k_pe] yet: "
                             "use the full-precision cache ('auto')")
        has_rope = getattr(model, "rope_cos", None) is not None
        positions = positions or ("cache" if has_rope else "absolute")
        if positions == "cache" and not has_rope:
            raise ValueError("window positions=cache re-rotates keys with RoPE, and this model has learned "
                             "positions (GPT-2): use positions=absolute")
        rope = rope_frequencies(c) if positions == "cache" else None
        return cls(c.num_layers, c.num_kv_heads, c.head_dim, size, sinks, margin, batch, model.dtype, rope)

    # --- shape ---------------------------------------------------------------
    num_layers = property(lambda self: self.k.shape[0])
    batch = property(lambda self: self.k.shape[1])
    num_kv_heads = property(lambda self: self.k.shape[2])
    head_dim = property(lambda self: self.k.shape[4])
    dtype = property(lambda self: self.k.dtype)
    device = property(lambda self: self.k.device)

    @property
    def rotates_keys(self) -> bool:
        """True: the model must hand over keys and queries before RoPE (positions=cache)."""
        return self.rope is not None


    def __len__(self) -> int:
        return self.lengths[-1]

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    @property
    def used_bytes(self) -> int:
        n = len(self)
        held = min(n, self.sinks) + min(max(n - self.sinks, 0), self.ring)
        return self.nbytes * held // (self.sinks + self.ring)

    # --- attention -------------------------------------------------------------
    def _slots(self, positions: torch.Tensor) -> torch.Tensor:
        """Storage slot of each absolute token position: sinks first, then the ring."""
        s = self.sinks
        return torch.where(positions < s, positions, s + (positions - s) % self.ring)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               window: int | None = None) -> torch.Tensor:
        layer = self._layer(layer)
        check_kv(self, layer, k, v)
        n, new = self.lengths[layer], k.shape[2]
        size = min(self.size, window) if window else self.size
        pos_q = torch.arange(n, n + new)
        if self.rope is not None:
            k = self._rotate(k, pos_q)  # once, at its absolute position
            if new == 1 and n >= self.sinks:
                return self._decode(layer, q, k, v, n, size)
        lo = max(self.sinks, n - size + 1)
        held = torch.cat([torch.arange(min(self.sinks, n)), torch.arange(lo, max(lo, n))])
        old = self._slots(held)
        keys = torch.cat([self.k[layer].index_select(2, old), k], dim=2)
        values = torch.cat([self.v[layer].index_select(2, old), v], dim=2)
        out = self._attention(q, keys, values, pos_q, torch.cat([held, pos_q]), size)
        self._store(layer, k, v, n)
        return out

    def _attention(self, q, keys, values, pos_q, pos_k, size) -> torch.Tensor:
        """Each query over the sinks and the last ``size`` positions up to itself."""
        causal = pos_k[None, :] <= pos_q[:, None]
        in_window = pos_k[None, :] > pos_q[:, None] - size
        sink = pos_k < self.sinks
        if self.rope is None:  # keys were rotated at absolute positions by the model
            return attention(q, keys, values, mask=causal & (sink[None, :] | in_window))
        wi, si = (~sink).nonzero()[:, 0], sink.nonzero()[:, 0]
        parts = []
        if len(wi):  # window keys at their true distance: the query at its absolute position
            scores = grouped_scores(self._rotate(q, pos_q), keys[:, :, wi])
            parts.append(softmax_partial(scores.masked_fill(~(causal & in_window)[:, wi], float("-inf")),
                                         values[:, :, wi].unsqueeze(2)))
        if len(si):  # sinks at their index: the query at its rank among the kept keys
            scores = grouped_scores(self._rotate(q, self._rank(pos_q, size)), keys[:, :, si])
            parts.append(softmax_partial(scores.masked_fill(~causal[:, si], float("-inf")),
                                         values[:, :, si].unsqueeze(2)))
        return merge_partials(parts).reshape(q.shape[0], q.shape[1], q.shape[2], -1)

    def _decode(self, layer: int, q, k, v, n: int, size: int) -> torch.Tensor:
        """One new token, sinks full: attend over the ring in place (slot order does not matter to softmax)."""
        self._store(layer, k, v, n)
        s = self.sinks
        ring_k, ring_v = self.k[layer][:, :, s:], self.v[layer][:, :, s:]
        if self._step is None or self._step[0] != n:  # the same for every layer of this step
            slot = torch.arange(self.ring)
            held = s + slot + self.ring * torch.div(n - s - slot, self.ring, rounding_mode="floor")
            mask = torch.zeros(self.ring, dtype=q.dtype).masked_fill((held < s) | (held <= n - size), float("-inf"))
            self._step = (n, mask)
        pos = torch.tensor([n])
        scores = grouped_scores(self._rotate(q, pos), ring_k) + self._step[1]
        if not s:
            out = torch.matmul(torch.softmax(scores, dim=-1), ring_v.unsqueeze(2))
            return out.reshape(q.shape[0], q.shape[1], 1, -1)
        parts = [softmax_partial(scores, ring_v.unsqueeze(2))]
        sink_scores = grouped_scores(self._rotate(q, self._rank(pos, size)), self.k[layer][:, :, :s])
        parts.append(softmax_partial(sink_scores, self.v[layer][:, :, :s].unsqueeze(2)))
        return merge_partials(parts).reshape(q.shape[0], q.shape[1], 1, -1)

    def _rank(self, pos_q: torch.Tensor, size: int) -> torch.Tensor:
        """Each query's index among the keys it keeps: its sinks, then its window (itself last)."""
        return torch.minimum(pos_q + 1, torch.tensor(self.sinks)) + (pos_q + 1 - self.sinks).clamp(0, size) - 1

    def _rotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """RoPE at any position (float64 angles, so none is too far), as the model's tables would rotate.
        Every layer of a step rotates at the same positions: the last few tables are kept."""
        # positions are always "+1 steps, then flat" (a range, or the ranks of one): ends and length fix them
        key = (int(positions[0]), int(positions[-1]), len(positions), x.dtype)
        trig = self._trig.get(key)
        if trig is None:
            inv_freq, scale = self.rope
            angles = positions.double()[:, None] * inv_freq[None, :]
            emb = torch.cat([angles, angles], dim=-1)
            trig = ((emb.cos() * scale).to(x.dtype), (emb.sin() * scale).to(x.dtype))
            if len(self._trig) > 8:
                self._trig.clear()
            self._trig[key] = trig
        return apply_rope(x, *trig)

    def _store(self, layer: int, k: torch.Tensor, v: torch.Tensor, n: int) -> None:
        """Write the new tokens into their slots; of more than a ring's worth, only the last ones survive."""
        new = k.shape[2]
        if new == 1:
            slot = n if n < self.sinks else self.sinks + (n - self.sinks) % self.ring
            self.k[layer][:, :, slot] = k[:, :, 0]
            self.v[layer][:, :, slot] = v[:, :, 0]
            self.lengths[layer] = n + 1
            return
        positions = torch.arange(n, n + new)
        keep = (positions < self.sinks) | (positions >= n + new - self.ring)
        idx = keep.nonzero()[:, 0]
        slots = self._slots(positions[idx])
        self.k[layer].index_copy_(2, slots, k.index_select(2, idx))
        self.v[layer].index_copy_(2, slots, v.index_select(2, idx))
        self.lengths[layer] = n + new

    rollback_option = "margin"

    @property
    def max_rollback(self) -> int:
        """Positions ``crop`` can always take back (the ``margin`` of evicted tokens still held)."""
        return self.ring - self.size

    # --- edits -------------------------------------------------------------------
    def _layer(self, layer: int) -> int:
        return check_layer(layer, self.num_layers)

    def crop(self, length: int) -> None:
        """Roll back to ``length`` tokens: possible while the tokens its window needs are still held
        (up to ``margin`` tokens back once the ring has wrapped)."""
        if not is_int(length):
            raise TypeError(f"cannot crop to {length!r}: the length must be an integer, got {type(length).__name__}")
        n = len(self)
        if not 0 <= length <= n:
            raise ValueError(f"cannot crop to {length}: the cache holds {n} positions")
        oldest_held = max(self.sinks, n - self.ring)
        if max(self.sinks, length - self.size + 1) < oldest_held:
            raise ValueError(f"cannot crop to {length}: a window cache rolls back at most margin = "
                             f"{self.ring - self.size} tokens once it has wrapped (it holds {n} tokens, "
                             f"the oldest from {oldest_held})")
        self.lengths = [min(x, int(length)) for x in self.lengths]

    def select(self, batch_indices: Sequence[int] | torch.Tensor) -> None:
        idx = batch_index_tensor(batch_indices, self.batch)
        k, v = self.k.index_select(1, idx), self.v.index_select(1, idx)
        self.k, self.v = k, v

    def reset(self) -> None:
        self.lengths = [0] * self.num_layers


def default_size(config) -> int:
    """The window when none is given: 1,024 tokens, at most half the model's context."""
    return min(1024, config.max_positions // 2)
