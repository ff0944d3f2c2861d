"""PagedKVCache driven by hand (no engine): block tables built here, logits
compared with the uncached dense forward of each sequence."""

from __future__ import annotations

import random

import pytest
import torch

from kvcache.caches.paged import BatchEntry, PagedKVCache
from kvcache.engine.block_manager import CopyOp
from kvcache.model.loader import load_model

pytestmark = pytest.mark.usefixtures("flush_denormals")

BS = 4
ATOL = 1e-4


@pytest.fixture(scope="module")
def model(model_dir):
    return load_model(model_dir)


@pytest.fixture(autouse=True)
def _inference():
    with torch.inference_mode():
        yield


def dense(model, tokens):
    """(len(tokens), vocab) logits of the uncached forward."""
    return model(torch.tensor([tokens]))[0]


def tokens_of(rng, n, vocab):
    return [rng.randrange(1, vocab - 1) for _ in range(n)]


def tables(rng, num_blocks, sizes):
    """Disjoint, shuffled (non-contiguous, unordered) block tables of the given lengths (in blocks)."""
    ids = list(range(num_blocks))
    rng.shuffle(ids)
    out = []
    for s in sizes:
        out.append(ids[:s])
        ids = ids[s:]
    return out


def nblocks(n):
    return -(-n // BS)


def run(model, cache, pieces):
    """One flattened forward. ``pieces`` = [(tokens_so_far, query_len, table)]; the new tokens are
    the last ``query_len`` of ``tokens_so_far``. Returns per piece its (query_len, vocab) logits."""
    ids, positions, entries = [], [], []
    for toks, q, table in pieces:
        ids += toks[len(toks) - q:]
        positions += range(len(toks) - q, len(toks))
        entries.append(BatchEntry(q, len(toks), table))
    cache.prepare(entries)
    logits = model(torch.tensor([ids]), torch.tensor([positions]), cache=cache,
                   logits_index=torch.arange(len(ids)))
    out, start = [], 0
    for _, q, _ in pieces:
        out.append(logits[start:start + q])
        start += q
    return out


def check(got, want):
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_prefill_then_decode(model):
    rng = random.Random(0)
    vocab = model.config.vocab_size
    seq = tokens_of(rng, 15, vocab)  # 10 prompt tokens, then 5 decode steps (teacher forced)
    ref = dense(model, seq)
    cache = PagedKVCache.for_model(model, num_blocks=12, block_size=BS)
    (table,) = tables(rng, 12, [nblocks(len(seq))])
    assert table != sorted(table)
    (logits,) = run(model, cache, [(seq[:10], 10, table)])
    check(logits, ref[:10])
    for n in range(11, len(seq) + 1):
        (logits,) = run(model, cache, [(seq[:n], 1, table)])
        check(logits, ref[n - 1:n])


def test_mixed_batch_prefills_and_decodes_in_one_forward(model):
    rng = random.Random(1)
    vocab = model.config.vocab_size
    a, b = tokens_of(rng, 7, vocab), tokens_of(rng, 5, vocab)      # will prefill in the mixed step
    c, d = tokens_of(rng, 12, vocab), tokens_of(rng, 8, vocab)     # will decode in the mixed step
    refs = {name: dense(model, s) for name, s in dict(a=a, b=b, c=c, d=d).items()}
    cache = PagedKVCache.for_model(model, num_blocks=24, block_size=BS)
    ta, tb, tc, td = tables(rng, 24, [nblocks(12), nblocks(10), nblocks(14), nblocks(11)])

    # c and d prefill together (all but their last token), in one forward
    lc, ld = run(model, cache, [(c[:9], 9, tc), (d[:6], 6, td)])
    check(lc, refs["c"][:9])
    check(ld, refs["d"][:6])

    # ONE forward: a prefills, c decodes, b prefills, d decodes (interleaved order)
    la, lc, lb, ld = run(model, cache, [(a, 7, ta), (c[:10], 1, tc), (b, 5, tb), (d[:7], 1, td)])
    check(la, refs["a"])
    check(lb, refs["b"])
    check(lc, refs["c"][9:10])
    check(ld, refs["d"][6:7])

    # the sequences prefilled above now decode, next to the others (unequal context lengths: padding)
    a2, b2 = a + tokens_of(rng, 3, vocab), b + tokens_of(rng, 3, vocab)
    ra, rb = dense(model, a2), dense(model, b2)
    # step 1: four decodes with contexts 6, 11, 8, 8
    lb, lc, la, ld = run(model, cache, [(b2[:6], 1, tb), (c[:11], 1, tc), (a2[:8], 1, ta), (d, 1, td)])
    check(lb, rb[5:6])
    check(lc, refs["c"][10:11])
    check(la, ra[7:8])
    check(ld, refs["d"][7:8])
    # step 2: d has finished; three decodes with contexts 7, 12, 9
    lb, lc, la = run(model, cache, [(b2[:7], 1, tb), (c, 1, tc), (a2[:9], 1, ta)])
    check(lb, rb[6:7])
    check(lc, refs["c"][11:12])
    check(la, ra[8:9])


def test_decode_batch_of_equal_lengths(model):
    """All decode contexts the same length (no padding mask)."""
    rng = random.Random(2)
    vocab = model.config.vocab_size
    seqs = [tokens_of(rng, 9, vocab) for _ in range(3)]
    cache = PagedKVCache.for_model(model, num_blocks=12, block_size=BS)
    tbls = tables(rng, 12, [3, 3, 3])
    run(model, cache, [(s[:8], 8, t) for s, t in zip(seqs, tbls)])
    outs = run(model, cache, [(s, 1, t) for s, t in zip(seqs, tbls)])
    for s, out in zip(seqs, outs):
        check(out, dense(model, s)[8:9])


def test_prefill_with_cached_prefix(model):
    """First blocks already filled (context_len > query_len), alone and shared by another sequence."""
    rng = random.Random(3)
    vocab = model.config.vocab_size
    prefix = tokens_of(rng, 8, vocab)                      # two full blocks
    x = prefix + tokens_of(rng, 3, vocab)
    y = prefix + tokens_of(rng, 6, vocab)
    cache = PagedKVCache.for_model(model, num_blocks=16, block_size=BS)
    shared, own_x, own_y = tables(rng, 16, [2, 1, 2])

    (lp,) = run(model, cache, [(prefix, 8, shared)])
    check(lp, dense(model, prefix))
    # x computes only its 3 new tokens over the cached prefix; y (sharing the same physical
    # prefix blocks) does too, in the same forward, next to a decode of x's continuation later
    lx, ly = run(model, cache, [(x, 3, shared + own_x), (y, 6, shared + own_y)])
    check(lx, dense(model, x)[8:])
    check(ly, dense(model, y)[8:])
    # a prefix hit that ends mid-block: 1 token of x's last block cached, 2 more computed
    z = x + tokens_of(rng, 2, vocab)
    own_z = [b for b in range(16) if b not in shared + own_x + own_y][:2]
    cache.copy_blocks([CopyOp(own_x[0], own_z[0])])
    (lz,) = run(model, cache, [(z, 2, shared + own_z)])
    check(lz, dense(model, z)[11:])


def test_copy_blocks_copies_whole_blocks_in_all_layers(model):
    nb = 8
    cache = PagedKVCache.for_model(model, num_blocks=nb, block_size=BS)
    assert cache.k.shape == cache.v.shape and cache.k.shape[0] == model.config.num_layers
    # layout-agnostic: find the slot axis (the only one of size num_blocks * block_size)
    assert list(cache.k.shape).count(nb * BS) == 1
    axis = list(cache.k.shape).index(nb * BS)

    def block(t, b):
        return t.narrow(axis, b * BS, BS)

    g = torch.Generator().manual_seed(0)
    cache.k.copy_(torch.randn(cache.k.shape, generator=g))
    cache.v.copy_(torch.randn(cache.v.shape, generator=g))
    k0, v0 = cache.k.clone(), cache.v.clone()
    cache.copy_blocks([CopyOp(2, 5), CopyOp(0, 7)])
    for src, dst in [(2, 5), (0, 7)]:
        assert torch.equal(block(cache.k, dst), block(k0, src))
        assert torch.equal(block(cache.v, dst), block(v0, src))
    for b in range(nb):
        if b not in (5, 7):
            assert torch.equal(block(cache.k, b), block(k0, b)) and torch.equal(block(cache.v, b), block(v0, b))
    cache.copy_blocks([])
    assert torch.equal(block(cache.k, 6), block(k0, 6))
    assert cache.nbytes == nb * PagedKVCache.bytes_per_block(model.config, BS)


def test_attend_requires_matching_prepare(model):
    cache = PagedKVCache.for_model(model, num_blocks=4, block_size=BS)
    ids, pos = torch.tensor([[1, 2, 3]]), torch.tensor([[0, 1, 2]])
    with pytest.raises(RuntimeError):
        model(ids, pos, cache=cache)
    cache.prepare([BatchEntry(4, 4, [1])])  # planned 4 tokens, forward has 3
    with pytest.raises(RuntimeError):
        model(ids, pos, cache=cache)
    c = model.config
    q = torch.zeros(1, c.num_heads, 2, c.head_dim)
    kv = torch.zeros(1, c.num_kv_heads, 2, c.head_dim)
    with pytest.raises(RuntimeError):
        cache.attend(0, q, kv, kv)
    cache.prepare([BatchEntry(3, 3, [2])])
    model(ids, pos, cache=cache)  # matching plan works


def test_constructor_validates():
    with pytest.raises(ValueError):
        PagedKVCache(num_layers=1, num_blocks=0, block_size=4, num_kv_heads=1, head_dim=8)


@pytest.mark.parametrize("heads", [1, 2, 3, 12])
def test_heads_matmul_equals_a_batched_matmul(heads, monkeypatch):
    from kvcache.caches.paged import _heads_matmul

    monkeypatch.setattr(torch, "get_num_threads", lambda: 16)  # the per-head oneDNN path for every count
    g = torch.Generator().manual_seed(heads)
    x, w = torch.randn(heads, 7, 16, generator=g), torch.randn(heads, 40, 16, generator=g)
    torch.testing.assert_close(_heads_matmul(x, w), torch.matmul(x, w.transpose(-1, -2)))
    v = torch.randn(heads, 40, 16, generator=g)  # (tokens, d): passed as a transposed view, as the cascade does
    y = torch.randn(heads, 7, 40, generator=g)
    torch.testing.assert_close(_heads_matmul(y, v.transpose(-1, -2)), torch.matmul(y, v))


@pytest.mark.parametrize("heads, kv_heads, dim, value_dim, in_keys", [(8, 2, 32, 32, False), (4, 4, 16, 16, False),
                                                                      (6, 1, 48, 32, True)])
def test_the_compiled_decode_kernel_equals_the_gathered_path(heads, kv_heads, dim, value_dim, in_keys, monkeypatch):
    """Keys read in place through the block tables (any table order, windows and sinks, a latent pool whose
    values are the keys' first channels) give the gathered PyTorch path's attention."""
    from kvcache.caches import kernels
    from kvcache.caches.visible import AttentionWindow

    if kernels.library() is None:
        pytest.skip("no C compiler")
    g = torch.Generator().manual_seed(heads)
    cache = PagedKVCache(1, 64, 4, kv_heads, dim, value_dim=value_dim, values_in_keys=in_keys)
    cache.k.normal_(generator=g)
    if cache.v is not None:
        cache.v.normal_(generator=g)
    rng = random.Random(dim)
    free = list(range(64))
    rng.shuffle(free)
    entries = []
    for n, window in [(1, None), (9, None), (31, AttentionWindow(6, 2)), (17, AttentionWindow(5)), (300 // 12, None),
                      (40, AttentionWindow(3, 5))]:
        table = [free.pop() for _ in range(-(-n // 4))]
        if window is not None:  # blocks behind the window are holes, as after a release
            first, stop = window.releasable(n - 1, 4, len(table))
            table = [None if first <= i < stop else b for i, b in enumerate(table)]
        entries.append(BatchEntry(1, n, table, window=window))
    q = torch.randn(1, heads, len(entries), dim, generator=g)
    k, v = torch.randn(1, kv_heads, len(entries), dim, generator=g), torch.randn(1, kv_heads, len(entries), value_dim,
                                                                                 generator=g)
    outs = []
    lib = kernels.library()
    for use in (True, False):
        monkeypatch.setattr(kernels, "library", lambda use=use: lib if use else None)
        cache.prepare(entries)
        outs.append(cache.attend(0, q, k, v))
        assert (cache.plan.kernel_args is not None) == use
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
