"""Prompt compression (SnapKV, H2O): each head keeps exactly the positions a plain reference of the policy keeps,
attention equals dense attention over each head's kept positions, a budget that holds everything is lossless,
and crop / select / bad input behave as the cache contract says."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from test_window import tiny_llama

from kvcache.caches.compressed import CompressedKVCache
from kvcache.caches.registry import make_cache, parse_spec
from kvcache.generation.generate import generate

MODEL = tiny_llama()
HEADS, KV_HEADS, DIM = 4, 2, 16


def qkv(n, seed=0, batch=1):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, h, n, DIM, generator=g, dtype=torch.float64) for h in (HEADS, KV_HEADS, KV_HEADS))


def cache(policy, budget, window, kernel=5, batch=1):
    return CompressedKVCache(1, KV_HEADS, DIM, batch=batch, capacity=8, dtype=torch.float64, budget=budget,
                             window=window, kernel=kernel, policy=policy)


def probs(q, k, qpos, kpos):
    """Softmax of one query over keys (float64), masked causally by absolute position."""
    scores = (k @ q) / DIM ** 0.5
    return torch.softmax(scores.masked_fill(kpos > qpos, float("-inf")), 0)


class Reference:
    """The policies written plainly: per batch row and KV head, a list of kept positions and a score each."""

    def __init__(self, policy, budget, window, kernel, batch=1):
        self.policy, self.budget, self.window, self.kernel = policy, budget, window, kernel
        self.kept = [[[] for _ in range(KV_HEADS)] for _ in range(batch)]
        self.score = [[{} for _ in range(KV_HEADS)] for _ in range(batch)]
        self.seen = 0

    def step(self, q, k, v):
        """Feed one chunk; returns the attention output every head computes over what it held plus the chunk."""
        b_n, _, new, _ = q.shape
        start, group = self.seen, HEADS // KV_HEADS
        out = torch.zeros_like(q)
        self.seen += new
        for b in range(b_n):
            for h in range(KV_HEADS):
                kept = self.kept[b][h] + list(range(start, start + new))
                kpos = torch.tensor(kept)
                keys = torch.stack([self.k[b, h, j] if j < start else k[b, h, j - start] for j in kept])
                vals = torch.stack([self.v[b, h, j] if j < start else v[b, h, j - start] for j in kept])
                votes = torch.zeros(len(kept), dtype=torch.float64)
                for g in range(group):
                    for i in range(new):
                        p = probs(q[b, h * group + g, i], keys, start + i, kpos)
                        out[b, h * group + g, i] = p @ vals
                        if self.policy == "h2o" or i >= new - self.window:
                            votes += p
                self.kept[b][h] = self._keep(b, h, kept, votes, new)
        self._remember(k, v, start)
        return out

    def _keep(self, b, h, kept, votes, new):
        recent = [j for j in kept if j >= self.seen - self.window]
        if self.policy == "snapkv":
            if new == 1 or new < self.window or len(kept) <= self.budget:
                return kept
            t = len(kept)
            pooled = F.avg_pool1d(votes.view(1, 1, t), self.kernel, 1, self.kernel // 2, count_include_pad=False)
            rank = {j: float(pooled[0, 0, i]) for i, j in enumerate(kept)}
        else:
            for j, p in zip(kept, votes.tolist()):
                self.score[b][h][j] = self.score[b][h].get(j, 0.0) + p
            if len(kept) <= self.budget:
                return kept
            rank = self.score[b][h]
        older = sorted((j for j in kept if j not in recent), key=lambda j: -rank[j])
        return sorted(older[:self.budget - len(recent)] + recent)

    def _remember(self, k, v, start):
        if start == 0:
            self.k, self.v = k, v
        else:
            self.k, self.v = torch.cat([self.k, k], 2), torch.cat([self.v, v], 2)


def held_sets(c):
    return [[c.kept_positions(0)[b, h].tolist() for h in range(KV_HEADS)] for b in range(c.batch)]


@settings(max_examples=30, deadline=None)
@given(policy=st.sampled_from(["snapkv", "h2o"]), budget=st.integers(3, 24), window=st.integers(1, 8),
       kernel=st.sampled_from([1, 3, 5, 7]), prompt=st.integers(1, 40), decode=st.integers(0, 12),
       batch=st.integers(1, 2))
def test_policy_keeps_what_the_reference_keeps_and_attention_is_exact(policy, budget, window, kernel, prompt,
                                                                      decode, batch):
    window = min(window, budget - 1)
    q, k, v = qkv(prompt + decode, seed=budget * 31 + prompt, batch=batch)
    c, ref = cache(policy, budget, window, kernel, batch), Reference(policy, budget, window, kernel, batch)
    chunks = [(0, prompt)] + [(prompt + i, prompt + i + 1) for i in range(decode)]
    for lo, hi in chunks:
        got = c.attend(0, q[:, :, lo:hi], k[:, :, lo:hi], v[:, :, lo:hi])
        want = ref.step(q[:, :, lo:hi], k[:, :, lo:hi], v[:, :, lo:hi])
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
        assert held_sets(c) == ref.kept
        assert len(c) == hi
    compressed_prompt = prompt if prompt < window and policy == "snapkv" else min(prompt, budget)
    assert c.lengths[0] == (min(prompt + decode, budget) if policy == "h2o" else compressed_prompt + decode)


@pytest.mark.parametrize("spec", ["snapkv:budget=512", "h2o:budget=512"])
def test_a_budget_that_holds_everything_is_lossless(spec):
    ids = torch.randint(0, 61, (120,), generator=torch.Generator().manual_seed(3)).tolist()
    assert generate(MODEL, ids, 40, cache=spec) == generate(MODEL, ids, 40, cache="auto")


def test_compression_bounds_memory_in_generate():
    ids = torch.randint(0, 61, (200,), generator=torch.Generator().manual_seed(4)).tolist()
    for spec, held in (("snapkv:budget=64,window=8", 64 + 9), ("h2o:budget=64,window=8", 64)):
        c = make_cache(spec, MODEL, capacity=210)
        generate(MODEL, ids, 10, cache=c)
        assert len(c) == 209 and c.lengths == [held] * MODEL.config.num_layers
        assert c.evicted[0] == 209 - held
        assert c.used_bytes < c.nbytes


def test_spec_strings():
    assert parse_spec("snapkv:budget=256,window=16,kernel=7") == (
        "snapkv", {"policy": "snapkv", "budget": 256, "window": 16, "kernel": 7})
    assert parse_spec("h2o:budget=128")[1] == {"policy": "h2o", "kernel": 1, "budget": 128}
    with pytest.raises(ValueError, match="option 'policy'"):
        parse_spec("h2o:policy=snapkv")
    with pytest.raises(ValueError, match="unknown option 'kernel' for 'h2o'"):  # SnapKV's pooling only
        parse_spec("h2o:kernel=3")
    with pytest.raises(ValueError, match="window .* must be smaller than budget"):
        make_cache("snapkv:budget=16,window=16", MODEL)


def test_crop_rolls_back_tokens_every_head_still_holds():
    q, k, v = qkv(40)
    for policy in ("snapkv", "h2o"):
        c = cache(policy, 12, 4)
        c.attend(0, q[:, :, :30], k[:, :, :30], v[:, :, :30])
        for i in range(30, 34):
            c.attend(0, q[:, :, i:i + 1], k[:, :, i:i + 1], v[:, :, i:i + 1])
        before = held_sets(c)
        c.crop(32)
        assert len(c) == 32 and held_sets(c) == [[[j for j in s if j < 32] for s in row] for row in before]
        out = c.attend(0, q[:, :, 32:33], k[:, :, 32:33], v[:, :, 32:33])
        assert out.shape == (1, HEADS, 1, DIM)
        snapshot = (c.k.clone(), c.pos.clone(), list(c.lengths), list(c.seen))
        with pytest.raises(ValueError, match="already evicted"):
            c.crop(5)
        assert torch.equal(c.k, snapshot[0]) and torch.equal(c.pos, snapshot[1])
        assert (c.lengths, c.seen) == (snapshot[2], snapshot[3])


def test_select_reorders_rows_with_their_positions_and_scores():
    q, k, v = qkv(30, batch=2)
    c = cache("h2o", 10, 3, batch=2)
    c.attend(0, q, k, v)
    rows = held_sets(c)
    score = c.score.clone()
    c.select([1, 1, 0])
    assert held_sets(c) == [rows[1], rows[1], rows[0]]
    assert torch.equal(c.score[:, 0], score[:, 1])


def test_bad_input_leaves_the_cache_as_it_was():
    q, k, v = qkv(20)
    c = cache("snapkv", 8, 2)
    c.attend(0, q[:, :, :10], k[:, :, :10], v[:, :, :10])
    state = (c.k.clone(), c.pos.clone(), list(c.lengths), list(c.seen))
    with pytest.raises(ValueError, match="KV heads"):
        c.attend(0, q[:, :, 10:11], k[:, :1, 10:11], v[:, :1, 10:11])
    with pytest.raises(ValueError, match="sliding-window"):
        c.attend(0, q[:, :, 10:11], k[:, :, 10:11], v[:, :, 10:11], window=4)
    with pytest.raises(TypeError, match="integer"):
        c.crop(3.5)
    assert torch.equal(c.k, state[0]) and torch.equal(c.pos, state[1]) and (c.lengths, c.seen) == state[2:]
