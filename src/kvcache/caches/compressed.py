"""Prompt compression: keep, per KV head, the ``budget`` positions attention needs most (SnapKV, H2O).

A long prompt costs KV memory and decode time for every token it holds, yet each head attends to few of
them.  Both policies keep a fixed number of positions per KV head (each head its own set) and drop the rest:

* ``snapkv`` (Li et al., 2024): when a prompt chunk of at least ``window`` tokens arrives, its last
  ``window`` queries vote: their attention over the older positions, summed over the queries and the
  head's query group, smoothed by an average pool of width ``kernel``.  Each KV head keeps its
  ``budget - window`` best-voted older positions plus the last ``window``.  The prompt's own attention is
  exact (computed before anything is dropped); generated tokens are appended, never evicted.
* ``h2o`` (Zhang et al., 2023, "heavy hitters"): every query's attention is added to each key's score;
  whenever more than ``budget`` positions are held, the lowest-scored ones outside the last ``window``
  are evicted, so memory stays at ``budget`` through decoding too.  A decode step evicts one slot and
  writes the new token into it (no compaction, no copy).

Keys are stored after the model's RoPE (absolute positions), so dropping a position never changes how
the others are rotated.  Attention over the cache equals dense attention restricted to each head's kept
positions (``kept_positions``; tests/caches/test_compressed.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..checks import is_int
from ..model.attention import attention, grouped_scores
from .base import Option
from .contiguous import ContiguousKVCache, batch_index_tensor, check_kv


class CompressedKVCache(ContiguousKVCache):
    lossless = False  # dropped positions are forgotten
    options = {
        "budget": Option(int, 1024, "positions kept per KV head (snapkv: of each prompt; h2o: at all times)",
                         minimum=2),
        "window": Option(int, 32, "snapkv: the last prompt queries that vote, always kept; h2o: the most recent "
                         "tokens, never evicted", minimum=1),
        "kernel": Option(int, 5, "snapkv: width of the average pool that smooths the votes", minimum=1),
        "policy": Option(str, "snapkv", "snapkv: compress each prompt once; h2o: evict by accumulated attention",
                         choices=("snapkv", "h2o")),
    }

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, batch: int = 1, capacity: int = 256,
                 dtype: torch.dtype = torch.float32, budget: int = 1024, window: int = 32, kernel: int = 5,
                 policy: str = "snapkv"):
        if policy not in ("snapkv", "h2o"):
            raise ValueError(f"unknown compression policy {policy!r}: expected snapkv or h2o")
        for name, value, low in (("budget", budget, 2), ("window", window, 1), ("kernel", kernel, 1)):
            if not is_int(value) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if window >= budget:
            raise ValueError(f"window ({window}) must be smaller than budget ({budget}): the budget holds the "
                             "window's tokens plus the chosen older ones")
        super().__init__(num_layers, num_kv_heads, head_dim, batch=batch,
                         capacity=max(2, min(capacity, budget + 64)), dtype=dtype)
        self.budget, self.window, self.kernel, self.policy = budget, window, kernel, policy
        self.pos = torch.zeros(self.k.shape[:4], dtype=torch.long)  # absolute position of each slot
        self.score = torch.zeros(self.k.shape[:4], dtype=torch.float32) if policy == "h2o" else None
        self.seen = [0] * num_layers  # tokens seen per layer: the absolute position of the next one
        self.evicted = [0] * num_layers  # positions dropped per layer and KV head, so far

    @classmethod
    def for_model(cls, model, batch: int = 1, capacity: int | None = None, budget: int = 1024, window: int = 32,
                  kernel: int = 5, policy: str = "snapkv") -> "CompressedKVCache":
        c = model.config
        if c.mla is not None:
            raise ValueError(f"the {policy} cache does not compress latent (MLA) attention yet: use 'auto'")
        if c.sliding_window and c.sliding_window < c.max_positions:
            raise ValueError(f"the {policy} cache does not combine with a sliding-window model's own window: "
                             "use 'window:positions=absolute' or the full cache")
        return cls(c.num_layers, c.num_kv_heads, c.head_dim, batch=batch,
                   capacity=c.max_positions if capacity is None else capacity, dtype=model.dtype,
                   budget=budget, window=window, kernel=kernel, policy=policy)

    def __len__(self) -> int:
        return self.seen[-1]

    @property
    def used_bytes(self) -> int:
        return self.nbytes * self.lengths[-1] // self.capacity

    def layer_length(self, layer: int) -> int:
        return self.seen[self._layer(layer)]

    def kept_positions(self, layer: int) -> torch.Tensor:
        """(batch, kv_heads, held) absolute positions ``layer`` holds, sorted: what each head can attend to."""
        layer = self._layer(layer)
        return self.pos[layer, :, :, :self.lengths[layer]].sort(-1).values

    # --- attention -------------------------------------------------------------
    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               window: int | None = None) -> torch.Tensor:
        if window is not None:
            raise ValueError(f"the {self.policy} cache does not serve sliding-window attention")
        layer = self._layer(layer)
        check_kv(self, layer, k, v)
        if k.shape[2] == 1:
            return self._decode(layer, q, k, v)
        held, new, start = self.lengths[layer], k.shape[2], self.seen[layer]
        keys = torch.cat([self.k[layer, :, :, :held], k], 2)
        values = torch.cat([self.v[layer, :, :, :held], v], 2)
        positions = torch.cat([self.pos[layer, :, :, :held],
                               torch.arange(start, start + new).expand(self.batch, self.num_kv_heads, new)], 2)
        votes = None
        if self.policy == "h2o":
            out, votes = _attention_with_column_sums(q, keys, values)
            votes[..., :held] += self.score[layer, :, :, :held]
        else:
            out = attention(q, keys, values)
            if new >= self.window and held + new > self.budget:
                votes = _snapkv_votes(q[:, :, -self.window:], keys, self.kernel)
        self.seen[layer] = start + new
        if votes is None or keys.shape[2] <= self.budget:  # nothing to drop: append
            self._write(layer, held, k, v, positions[:, :, held:], votes)
        else:
            self._compress(layer, keys, values, positions, votes)
        return out

    def _decode(self, layer: int, q, k, v) -> torch.Tensor:
        """One token: written in place and attended over the held slots (h2o then evicts one old slot)."""
        held, n = self.lengths[layer], self.seen[layer]
        self._write(layer, held, k, v, torch.full((self.batch, self.num_kv_heads, 1), n), None)
        self.seen[layer] = n + 1
        keys, values = self.k[layer, :, :, :held + 1], self.v[layer, :, :, :held + 1]
        if self.policy == "snapkv":
            return attention(q, keys, values)
        out, votes = _attention_with_column_sums(q, keys, values)
        self.score[layer, :, :, :held + 1] += votes
        if held + 1 > self.budget:
            self._evict_one(layer, held)
        return out

    def _compress(self, layer, keys, values, positions, votes) -> None:
        """Keep the recent ``window`` positions and the ``budget - window`` best-voted older ones per head."""
        recent = positions >= self.seen[layer] - self.window
        chosen = votes.masked_fill(recent, float("-inf")).topk(self.budget - self.window, dim=-1).indices
        idx = torch.cat([chosen, recent.nonzero()[:, 2].view(self.batch, self.num_kv_heads, -1)], -1)
        self._write(layer, 0, _take(keys, idx), _take(values, idx), positions.gather(2, idx),
                    None if self.score is None else votes.gather(2, idx))
        self.evicted[layer] += keys.shape[2] - self.budget

    def _evict_one(self, layer: int, last: int) -> None:
        """H2O's decode step: the lowest-scored old slot (outside the recent window) takes the new token
        from slot ``last``."""
        held = slice(0, last)
        old = self.score[layer, :, :, held].masked_fill(
            self.pos[layer, :, :, held] >= self.seen[layer] - self.window, float("inf"))
        slot = old.argmin(-1, keepdim=True)  # (batch, kv_heads, 1)
        for t in (self.pos, self.score):
            t[layer].scatter_(2, slot, t[layer, :, :, last:last + 1].clone())
        idx = slot.unsqueeze(-1).expand(-1, -1, -1, self.head_dim)
        for t in (self.k, self.v):
            t[layer].scatter_(2, idx, t[layer, :, :, last:last + 1].clone())
        self.lengths[layer] = last
        self.evicted[layer] += 1

    def _write(self, layer, at, k, v, pos, votes) -> None:
        end = at + k.shape[2]
        if end > self.capacity:
            self._grow(end)
        self.k[layer, :, :, at:end], self.v[layer, :, :, at:end] = k, v
        self.pos[layer, :, :, at:end] = pos
        if self.score is not None:  # votes cover every slot up to end (None: a new token scores 0 so far)
            self.score[layer, :, :, at if votes is None else 0:end] = 0 if votes is None else votes
        self.lengths[layer] = end

    def _grow(self, needed: int) -> None:
        old = self.capacity
        super()._grow(needed)
        grow = self.capacity - old
        self.pos = F.pad(self.pos, (0, grow))
        if self.score is not None:
            self.score = F.pad(self.score, (0, grow))

    # --- edits -------------------------------------------------------------------
    rollback_option = "window"

    @property
    def max_rollback(self) -> int | None:
        """Positions ``crop`` can always take back: h2o keeps only the last ``window`` safe from eviction;
        snapkv compresses the prompt once and then only appends."""
        return self.window if self.policy == "h2o" else None

    def crop(self, length: int) -> None:
        """Roll back to ``length`` tokens: possible while every token after it is still held by every head
        (snapkv: tokens since the last prompt compression; h2o: the last ``window``).  Drops made
        meanwhile are not undone."""
        if not is_int(length):
            raise TypeError(f"cannot crop to {length!r}: the length must be an integer, got {type(length).__name__}")
        n = len(self)
        if not 0 <= length <= n:
            raise ValueError(f"cannot crop to {length}: the cache holds {n} positions")
        plans = []
        for layer in range(self.num_layers):
            held = self.pos[layer, :, :, :self.lengths[layer]]
            drop = held >= length
            count = drop.sum(-1)
            if int(count.min()) != int(count.max()) or int(count.max()) != self.seen[layer] - min(length,
                                                                                             self.seen[layer]):
                raise ValueError(f"cannot crop to {length}: tokens after it were already evicted (a {self.policy} "
                                 "cache rolls back only tokens every head still holds)")
            plans.append((drop.to(torch.int8).argsort(dim=-1, stable=True), self.lengths[layer] - int(count.max())))
        with torch.inference_mode(self.k.is_inference()):  # tensors grown during inference stay inference tensors
            self._compact(plans, int(length))

    def _compact(self, plans, length: int) -> None:
        for layer, (order, keep) in enumerate(plans):
            idx = order[..., :keep]
            held = self.lengths[layer]
            self.k[layer, :, :, :keep] = _take(self.k[layer, :, :, :held], idx)
            self.v[layer, :, :, :keep] = _take(self.v[layer, :, :, :held], idx)
            for t in (self.pos, self.score) if self.score is not None else (self.pos,):
                t[layer, :, :, :keep] = t[layer, :, :, :held].gather(2, idx)
            self.lengths[layer], self.seen[layer] = keep, min(self.seen[layer], length)

    def select(self, batch_indices) -> None:
        idx = batch_index_tensor(batch_indices, self.batch)
        pos = self.pos.index_select(1, idx)
        score = None if self.score is None else self.score.index_select(1, idx)
        super().select(idx)
        self.pos, self.score = pos, score

    reorder = select

    def reset(self) -> None:
        super().reset()
        self.seen = [0] * self.num_layers
        self.evicted = [0] * self.num_layers


def _take(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x (batch, heads, t, d) at positions idx (batch, heads, k) along t."""
    return x.gather(2, idx.unsqueeze(-1).expand(-1, -1, -1, x.shape[-1]))


def _grouped_probs(q: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Softmax attention (batch, kv_heads, group, seq_q, seq_k) without repeating keys."""
    scores = grouped_scores(q, keys)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, -1)


def _snapkv_votes(q_window: torch.Tensor, keys: torch.Tensor, kernel: int) -> torch.Tensor:
    """(batch, kv_heads, seq_k): the window queries' attention per key, summed over queries and the group,
    average-pooled over neighbouring positions (so a kept token keeps its context)."""
    w, t = q_window.shape[2], keys.shape[2]
    causal = torch.arange(t)[None, :] <= torch.arange(t - w, t)[:, None]
    votes = _grouped_probs(q_window, keys, causal).sum((2, 3))
    b, h, _ = votes.shape
    pooled = F.avg_pool1d(votes.reshape(b * h, 1, t), kernel, stride=1, padding=kernel // 2,
                          count_include_pad=False)
    return pooled[..., :t].reshape(b, h, t)


def _attention_with_column_sums(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                                block: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention (the new queries are the last keys) and each key's attention summed over the
    queries and each KV head's group: H2O's scores.  Query blocks bound the score matrix's memory."""
    b, heads, seq, dim = q.shape
    t, kv = keys.shape[2], keys.shape[1]
    outs, sums = [], torch.zeros(b, kv, t, dtype=torch.float32)
    for lo in range(0, seq, block):
        hi = min(seq, lo + block)
        mask = None if seq == 1 else torch.arange(t)[None, :] <= torch.arange(t - seq + lo, t - seq + hi)[:, None]
        probs = _grouped_probs(q[:, :, lo:hi], keys, mask)
        outs.append(torch.matmul(probs, values.unsqueeze(2)).reshape(b, heads, hi - lo, -1))
        sums += probs.sum((2, 3)).float()
    return torch.cat(outs, 2), sums
