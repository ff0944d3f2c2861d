"""The quantized paged pool at the cache level: attention equals the single-stream quantized cache with the
engine's spec (residual 0, one block quantized at a time) for every sequence of a mixed batch, in both the
kernel and the PyTorch paths; the paged kernel equals the reference over scattered tiles."""

from __future__ import annotations

import random

import pytest
import torch

from kvcache.caches import kernels
from kvcache.caches.paged import BatchEntry
from kvcache.caches.paged_quantized import PagedQuantizedKVCache, engine_spec
from kvcache.caches.quant_ops import QuantFormat, QuantizedRows, quantize, quantized_partial, to_tiles
from kvcache.caches.quantized import QuantizedKVCache
from kvcache.caches.registry import parse_spec
from kvcache.engine.block_manager import CopyOp
from kvcache.model.attention import merge_partials

needs_kernel = pytest.mark.skipif(kernels.library() is None, reason="the kernel did not build here")
LAYERS, KV_HEADS, HEADS, DIM, BS = 2, 2, 4, 32, 16


def randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@needs_kernel
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("per_channel,key_group,value_group", [(False, 32, 32), (True, 16, 32), (True, 32, 64)])
def test_paged_kernel_equals_the_reference_over_scattered_tiles(bits, per_channel, key_group, value_group):
    dim, tiles_total, batch = 64, 24, 3
    kf, vf = QuantFormat(bits, key_group, per_channel=per_channel), QuantFormat(bits, value_group)
    k, v = randn(1, 2, tiles_total * 16, dim, seed=1), randn(1, 2, tiles_total * 16, dim, seed=2)
    kc, ks, ko = quantize(k, kf)
    vc, vs, vo = quantize(v, vf)
    kc = to_tiles(kc)
    if not per_channel:
        ks, ko = to_tiles(ks), to_tiles(ko)
    unit = key_group // 16 if per_channel else 1  # KIVI blocks are whole: pick tiles a key group at a time
    order = random.Random(0).sample(range(tiles_total // unit), tiles_total // unit)
    tables = [[b * unit + j for b in order[i::batch] for j in range(unit)] for i in range(batch)]
    counts = [len(tables[0]) * 16, len(tables[1]) * 16 - 16 * unit, 0]
    width = max(len(t) for t in tables)
    tiles = torch.zeros(batch, width, dtype=torch.int32)
    for i, t in enumerate(tables):
        tiles[i, : len(t)] = torch.tensor(t)
    q = randn(batch, 2, 3, dim, seed=3) * 0.5
    fk, fv = randn(batch, 2, 16, dim, seed=4), randn(batch, 2, 16, dim, seed=5)
    fcounts = [5, 16, 1]
    got = kernels.quant_decode(q, kc, ks, ko, vc, vs, vo, torch.tensor(counts), bits, key_group, value_group,
                               per_channel, fk, fv, torch.tensor(fcounts), tiles=tiles)
    for b in range(batch):
        scores = q[b:b + 1] @ fk[b:b + 1, :, : fcounts[b]].transpose(-1, -2)
        e = torch.exp(scores - scores.amax(-1, keepdim=True))
        parts = [(e @ fv[b:b + 1, :, : fcounts[b]], scores.amax(-1, keepdim=True), e.sum(-1, keepdim=True))]
        if counts[b]:
            ids = torch.tensor(tables[b][: counts[b] // 16])
            tok = (ids[:, None] * 16 + torch.arange(16)).flatten()
            kscale = (ks.index_select(2, (ids[::unit] * 16 // key_group)) if per_channel else ks.index_select(2, ids))
            koff = (ko.index_select(2, (ids[::unit] * 16 // key_group)) if per_channel else ko.index_select(2, ids))
            rows = QuantizedRows(kc.index_select(2, ids), kscale, koff, vc.index_select(2, tok),
                                 vs.index_select(2, tok), vo.index_select(2, tok), counts[b])
            parts.append(quantized_partial(q[b:b + 1], rows, kf, vf))
        torch.testing.assert_close(got[b:b + 1], merge_partials(parts), atol=2e-5, rtol=2e-5)


def _caches(spec, kernel):
    resolved = engine_spec(spec, BS)
    pool = PagedQuantizedKVCache(LAYERS, 40, BS, KV_HEADS, DIM, resolved, staging_blocks=2)
    pool.use_kernel = pool.use_kernel and kernel
    singles = [QuantizedKVCache(LAYERS, KV_HEADS, DIM, capacity=256, kernel=kernel, **parse_spec(resolved)[1])
               for _ in range(3)]
    return pool, singles


@pytest.mark.parametrize("kernel", [True, False])
@pytest.mark.parametrize("spec", ["int8", "int4", "int4:rotate=1", "int4:keys=token,group=16,value_group=16"])
def test_pool_attention_equals_the_single_stream_cache(spec, kernel):
    if kernel and kernels.library() is None:
        pytest.skip("the kernel did not build here")
    pool, singles = _caches(spec, kernel)
    free = random.Random(1).sample(range(40), 40)
    tables = [[], [], []]
    lengths = [0, 0, 0]
    # steps of (tokens added per sequence): prefill chunks crossing blocks, decodes, a block filled exactly
    schedule = [(20, 16, 0), (1, 1, 37), (12, 1, 1), *[(1, 1, 1)] * 14, (1, 30, 1), (1, 1, 1)]
    for step, adds in enumerate(schedule):
        entries, chunks = [], []
        for i, n in enumerate(adds):
            if n == 0:
                continue
            lengths[i] += n
            while len(tables[i]) * BS < lengths[i]:
                tables[i].append(free.pop())
            entries.append(BatchEntry(n, lengths[i], list(tables[i])))
            chunks.append((i, n))
        total = sum(n for _, n in chunks)
        pool.prepare(entries)
        for layer in range(LAYERS):
            seed = 100 * step + layer
            q, k, v = randn(1, HEADS, total, DIM, seed=seed), randn(1, KV_HEADS, total, DIM, seed=seed + 1), \
                randn(1, KV_HEADS, total, DIM, seed=seed + 2)
            got = pool.attend(layer, q, k, v)
            at = 0
            for i, n in chunks:
                want = singles[i].attend(layer, q[:, :, at:at + n], k[:, :, at:at + n], v[:, :, at:at + n])
                torch.testing.assert_close(got[:, :, at:at + n], want, atol=2e-5, rtol=2e-5)
                at += n
    assert len(pool.slots) <= 3


def test_copy_blocks_copies_codes_and_staging():
    pool, _ = _caches("int8", True)
    pool.prepare([BatchEntry(20, 20, [3, 7])])  # block 3 full (stored), block 7 partial (staging)
    for layer in range(LAYERS):
        pool.attend(layer, randn(1, HEADS, 20, DIM, seed=layer), randn(1, KV_HEADS, 20, DIM, seed=9),
                    randn(1, KV_HEADS, 20, DIM, seed=8))
    pool.copy_blocks([CopyOp(7, 9), CopyOp(3, 5)])
    s7, s9 = pool.slots[7] * BS, pool.slots[9] * BS
    assert torch.equal(pool.stage_k[:, :, s9:s9 + BS], pool.stage_k[:, :, s7:s7 + BS])
    vc = pool.store.tensors["vc"]
    assert torch.equal(vc[:, :, :, 5 * BS:6 * BS], vc[:, :, :, 3 * BS:4 * BS])


def test_huge_values_are_refused_before_anything_is_stored():
    pool, _ = _caches("int8", True)
    pool.prepare([BatchEntry(20, 20, [3, 7])])
    stored = {name: t.clone() for name, t in pool.store.tensors.items()}
    staged = pool.stage_k.clone()
    k = randn(1, KV_HEADS, 20, DIM, seed=1)
    k[0, 0, 4, 0] = 1e6
    with pytest.raises(ValueError, match="float16 range"):
        pool.attend(0, randn(1, HEADS, 20, DIM, seed=0), k, randn(1, KV_HEADS, 20, DIM, seed=2))
    assert all(torch.equal(stored[name], t) for name, t in pool.store.tensors.items())
    assert torch.equal(staged, pool.stage_k)


def test_attend_without_prepare_is_refused():
    pool, _ = _caches("int8", True)
    with pytest.raises(RuntimeError, match="prepare"):
        pool.attend(0, randn(1, HEADS, 1, DIM, seed=0), randn(1, KV_HEADS, 1, DIM, seed=1),
                    randn(1, KV_HEADS, 1, DIM, seed=2))
