"""ContiguousKVCache: views, growth, crop, select/reorder, reset, nbytes, input validation.

Validation tests check both the error and that a refused call left the cache
exactly as it was; a hypothesis test drives random update/crop/select
sequences against a torch.cat reference holding per-layer tensors.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvcache.caches.contiguous import CacheIndexError, ContiguousKVCache

LAYERS, HEADS, DIM = 2, 2, 4


def kv(n, batch=2, heads=HEADS, dim=DIM, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, heads, n, dim, generator=g).to(dtype),
            torch.randn(batch, heads, n, dim, generator=g).to(dtype))


def fill(cache, n, seed=0):
    """A forward pass's worth of writes: n positions into every layer; returns what was written."""
    written = []
    for layer in range(cache.num_layers):
        k, v = kv(n, batch=cache.batch, seed=seed + layer)
        cache.update(layer, k, v)
        written.append((k, v))
    return written


def snapshot(cache):
    return {"len": len(cache), "lengths": list(cache.lengths), "capacity": cache.capacity, "batch": cache.batch,
            "k": cache.k.clone(), "v": cache.v.clone()}


def assert_unchanged(cache, before):
    after = snapshot(cache)
    for key in ("len", "lengths", "capacity", "batch"):
        assert after[key] == before[key], key
    assert torch.equal(after["k"], before["k"]) and torch.equal(after["v"], before["v"])


def shares_storage(view, base):
    return view.untyped_storage().data_ptr() == base.untyped_storage().data_ptr()


# --------------------------------------------------------------------- basics

def test_update_returns_views_of_everything_cached():
    cache = ContiguousKVCache(LAYERS, HEADS, DIM, batch=2, capacity=16)
    k1, v1 = kv(3, seed=1)
    k2, v2 = kv(2, seed=2)
    cache.update(0, k1, v1)
    keys, values = cache.update(0, k2, v2)
    torch.testing.assert_close(keys, torch.cat([k1, k2], dim=2), rtol=0, atol=0)
    torch.testing.assert_close(values, torch.cat([v1, v2], dim=2), rtol=0, atol=0)
    assert shares_storage(keys, cache.k) and shares_storage(values, cache.v)  # views, not copies
    assert cache.lengths == [5, 0] and len(cache) == 0  # len counts positions cached in every layer
    cache.update(1, *kv(5, seed=3))
    assert len(cache) == 5
    torch.testing.assert_close(cache.keys(0), torch.cat([k1, k2], dim=2), rtol=0, atol=0)
    torch.testing.assert_close(cache.values(0), torch.cat([v1, v2], dim=2), rtol=0, atol=0)


def test_growth_beyond_capacity_keeps_contents():
    cache = ContiguousKVCache(LAYERS, HEADS, DIM, batch=2, capacity=4)
    first = fill(cache, 3, seed=10)
    second = fill(cache, 3, seed=20)  # 6 > 4: must reallocate
    assert cache.capacity >= 6 and len(cache) == 6
    for layer in range(LAYERS):
        torch.testing.assert_close(cache.keys(layer), torch.cat([first[layer][0], second[layer][0]], 2), rtol=0, atol=0)
        torch.testing.assert_close(cache.values(layer), torch.cat([first[layer][1], second[layer][1]], 2),
                                   rtol=0, atol=0)
    n = 3 * cache.capacity  # one write larger than doubling provides
    big = fill(cache, n, seed=30)
    assert len(cache) == 6 + n and cache.capacity >= len(cache)
    torch.testing.assert_close(cache.keys(1)[:, :, 6:], big[1][0], rtol=0, atol=0)
    torch.testing.assert_close(cache.keys(1)[:, :, :3], first[1][0], rtol=0, atol=0)


def test_crop_then_overwrite():
    cache = ContiguousKVCache(LAYERS, HEADS, DIM, batch=2, capacity=8)
    first = fill(cache, 6, seed=1)
    cache.crop(6)  # no-op
    assert len(cache) == 6
    cache.crop(4)
    assert len(cache) == 4 and cache.lengths == [4, 4]
    for layer in range(LAYERS):
        torch.testing.assert_close(cache.keys(layer), first[layer][0][:, :, :4], rtol=0, atol=0)
    new = fill(cache, 2, seed=50)  # positions 4, 5 rewritten with new data
    for layer in range(LAYERS):
        expected = torch.cat([first[layer][0][:, :, :4], new[layer][0]], dim=2)
        torch.testing.assert_close(cache.keys(layer), expected, rtol=0, atol=0)
    cache.crop(0)
    assert len(cache) == 0 and cache.keys(0).shape[2] == 0


def test_select_reorders_and_duplicates_rows():
    cache = ContiguousKVCache(LAYERS, HEADS, DIM, batch=3, capacity=8)
    written = fill(cache, 4, seed=7)
    cache.select([2, 0, 0])  # beam search: beam 0 forks into two, beam 1 dies
    assert cache.batch == 3 and len(cache) == 4
    for layer in range(LAYERS):
        k, v = written[layer]
        torch.testing.assert_close(cache.keys(layer), k[[2, 0, 0]], rtol=0, atol=0)
        torch.testing.assert_close(cache.values(layer), v[[2, 0, 0]], rtol=0, atol=0)
    # duplicated rows are independent copies: new writes to one do not leak into the other
    nk, nv = kv(1, batch=3, seed=99)
    keys, _ = cache.update(0, nk, nv)
    torch.testing.assert_close(keys[1, :, 4], nk[1, :, 0], rtol=0, atol=0)
    torch.testing.assert_close(keys[2, :, 4], nk[2, :, 0], rtol=0, atol=0)
    torch.testing.assert_close(keys[1, :, :4], keys[2, :, :4], rtol=0, atol=0)

    cache.reorder(torch.tensor([1]))  # alias; shrinks the batch
    assert cache.batch == 1
    torch.testing.assert_close(cache.keys(1), written[1][0][[0]], rtol=0, atol=0)


def test_reset():
    cache = ContiguousKVCache(LAYERS, HEADS, DIM, batch=2, capacity=8)
    fill(cache, 5)
    cache.reset()
    assert len(cache) == 0 and cache.lengths == [0, 0]
    k, v = kv(2, seed=3)
    keys, values = cache.update(0, k, v)
    torch.testing.assert_close(keys, k, rtol=0, atol=0)
    torch.testing.assert_close(values, v, rtol=0, atol=0)


@pytest.mark.parametrize("dtype,itemsize", [(torch.float32, 4), (torch.float64, 8), (torch.bfloat16, 2)])
def test_nbytes(dtype, itemsize):
    cache = ContiguousKVCache(3, 2, 8, batch=2, capacity=10, dtype=dtype)
    expected = 2 * 3 * 2 * 2 * 10 * 8 * itemsize  # K and V, layers, batch, heads, capacity, head_dim
    assert cache.nbytes == expected
    assert cache.used_bytes == 0
    for layer in range(3):
        cache.update(layer, *kv(5, heads=2, dim=8, dtype=dtype))
    assert cache.nbytes == expected and cache.used_bytes == expected // 2


SIZE_ARGS = ["num_layers", "num_kv_heads", "head_dim", "batch", "capacity"]


@pytest.mark.parametrize("arg", SIZE_ARGS)
@pytest.mark.parametrize("value,exc", [(0, ValueError), (-2, ValueError), (None, TypeError), (2.5, TypeError),
                                       (2.0, TypeError), ("4", TypeError), (True, TypeError)])
def test_constructor_rejects_bad_sizes_naming_the_argument(arg, value, exc):
    kwargs = dict(num_layers=LAYERS, num_kv_heads=HEADS, head_dim=DIM, batch=2, capacity=4)
    with pytest.raises(exc, match=arg):
        ContiguousKVCache(**{**kwargs, arg: value})


def test_constructor_accepts_numpy_integers_and_rejects_bad_dtype_or_flag():
    cache = ContiguousKVCache(np.int64(2), np.int32(HEADS), DIM, batch=np.int64(1), capacity=np.uint8(4))
    assert (cache.num_layers, cache.num_kv_heads, cache.batch, cache.capacity) == (2, HEADS, 1, 4)
    assert isinstance(cache.lengths[0], int) and type(cache.num_layers) is int
    with pytest.raises(TypeError, match="dtype"):
        ContiguousKVCache(LAYERS, HEADS, DIM, dtype=torch.int64)
    with pytest.raises(TypeError, match="dtype"):
        ContiguousKVCache(LAYERS, HEADS, DIM, dtype="float32")
    with pytest.raises(TypeError, match="check_finite"):
        ContiguousKVCache(LAYERS, HEADS, DIM, check_finite="no")


@pytest.mark.parametrize("indices", [[1, 0, 1], (1, 0, 1), np.array([1, 0, 1]), torch.tensor([1, 0, 1]),
                                     torch.tensor([1, 0, 1], dtype=torch.int32), [np.int64(1), 0, np.int32(1)]],
                         ids=["list", "tuple", "numpy", "tensor", "int32 tensor", "numpy scalars"])
def test_select_accepts_integer_sequences_tensors_and_arrays(indices):
    cache = ContiguousKVCache(LAYERS, HEADS, DIM, batch=2, capacity=4)
    written = fill(cache, 3, seed=2)
    cache.select(indices)
    assert cache.batch == 3
    torch.testing.assert_close(cache.keys(1), written[1][0][[1, 0, 1]], rtol=0, atol=0)
    cache.select(range(2))
    assert cache.batch == 2


def test_index_errors_are_both_index_and_value_errors():
    assert issubclass(CacheIndexError, IndexError) and issubclass(CacheIndexError, ValueError)
    cache = ContiguousKVCache(LAYERS, HEADS, DIM, batch=2, capacity=4)
    for call in (lambda: cache.update(LAYERS, *kv(1)), lambda: cache.select([2]), lambda: cache.keys(-1)):
        with pytest.raises(ValueError):
            call()
        with pytest.raises(IndexError):
            call()


def test_check_finite_false_accepts_nan():
    cache = ContiguousKVCache(1, HEADS, DIM, batch=2, capacity=4, check_finite=False)
    k, v = kv(1)
    k[0, 0, 0, 0] = float("nan")
    keys, _ = cache.update(0, k, v)
    assert torch.isnan(keys).any()


# ------------------------------------------------------------ invalid input

def _with_nan(n=1):
    k, v = kv(n)
    v[1, 0, n - 1, 2] = float("nan")
    return k, v


def _with_inf():
    k, v = kv(2)
    k[0, 1, 0, 0] = float("inf")
    return k, v


BAD_CALLS = [
    ("wrong batch", lambda c: c.update(0, *kv(1, batch=3)), ValueError, "batch"),
    ("wrong kv heads", lambda c: c.update(0, *kv(1, heads=HEADS * 2)), ValueError, "KV heads"),
    ("wrong head_dim", lambda c: c.update(0, *kv(1, dim=DIM + 1)), ValueError, "head_dim"),
    ("wrong dtype", lambda c: c.update(0, *kv(1, dtype=torch.float64)), TypeError, "dtype"),
    ("value dtype only", lambda c: c.update(0, kv(1)[0], kv(1, dtype=torch.float16)[1]), TypeError, "dtype"),
    ("k/v length mismatch", lambda c: c.update(0, kv(2)[0], kv(3)[1]), ValueError, "positions"),
    ("3-d tensor", lambda c: c.update(0, kv(1)[0][0], kv(1)[1][0]), ValueError, "shape"),
    ("not a tensor", lambda c: c.update(0, kv(1)[0].tolist(), kv(1)[1]), TypeError, "Tensor"),
    ("nan", lambda c: c.update(1, *_with_nan()), ValueError, "non-finite"),
    ("inf", lambda c: c.update(0, *_with_inf()), ValueError, "non-finite"),
    ("nan in a write that needs growth", lambda c: c.update(0, *_with_nan(20)), ValueError, "non-finite"),
    ("value on another device", lambda c: c.update(0, kv(1)[0], kv(1)[1].to("meta")), ValueError, "meta"),
    ("layer too large", lambda c: c.update(LAYERS, *kv(1)), CacheIndexError, "layer"),
    ("negative layer", lambda c: c.update(-1, *kv(1)), CacheIndexError, "layer"),
    ("float layer", lambda c: c.update(0.0, *kv(1)), TypeError, "layer must be an integer"),
    ("string layer", lambda c: c.update("0", *kv(1)), TypeError, "layer must be an integer"),
    ("bool layer", lambda c: c.update(True, *kv(1)), TypeError, "layer must be an integer"),
    ("None layer", lambda c: c.update(None, *kv(1)), TypeError, "layer must be an integer"),
    ("keys of a negative layer", lambda c: c.keys(-1), CacheIndexError, "layer"),
    ("crop beyond length", lambda c: c.crop(4), ValueError, "crop"),
    ("crop negative", lambda c: c.crop(-1), ValueError, "crop"),
    ("crop to a float", lambda c: c.crop(2.5), TypeError, "crop"),  # used to be stored, breaking the cache
    ("crop to an integral float", lambda c: c.crop(2.0), TypeError, "integer"),
    ("crop to True", lambda c: c.crop(True), TypeError, "integer"),  # bool is not a length (was crop(1))
    ("crop to a string", lambda c: c.crop("2"), TypeError, "integer"),
    ("crop to None", lambda c: c.crop(None), TypeError, "integer"),
    ("select out of range", lambda c: c.select([0, 2]), CacheIndexError, "out of range"),
    ("select negative", lambda c: c.select([-1]), CacheIndexError, "out of range"),
    ("select tensor out of range", lambda c: c.select(torch.tensor([0, 5])), CacheIndexError, "out of range"),
    ("select empty", lambda c: c.select([]), ValueError, "non-empty"),
    ("select empty tensor", lambda c: c.select(torch.tensor([], dtype=torch.long)), ValueError, "non-empty"),
    ("select 2-d", lambda c: c.select([[0, 1]]), ValueError, "1-D"),
    ("select 2-d tensor", lambda c: c.select(torch.tensor([[0, 1]])), ValueError, "1-D"),
    ("select 0-d tensor", lambda c: c.select(torch.tensor(1)), ValueError, "1-D"),
    ("select bool list", lambda c: c.select([True, False]), TypeError, "integers"),  # would mean rows 1, 0
    ("select bool tensor", lambda c: c.select(torch.tensor([True, False])), TypeError, "integers"),
    ("select bool array", lambda c: c.select(np.array([True, True])), TypeError, "integers"),
    ("select floats", lambda c: c.select([0.0, 1.0]), TypeError, "integers"),
    ("select float tensor", lambda c: c.select(torch.tensor([0.0, 1.0])), TypeError, "integers"),
    ("select float array", lambda c: c.select(np.array([0.5])), TypeError, "integers"),
    ("select string", lambda c: c.select("01"), TypeError, "sequence or tensor of integers"),
    ("select strings", lambda c: c.select(["0", "1"]), TypeError, "integers"),
    ("select an int", lambda c: c.select(1), TypeError, "sequence or tensor of integers"),
    ("select None", lambda c: c.select(None), TypeError, "sequence or tensor of integers"),
    ("select a set", lambda c: c.select({0, 1}), TypeError, "sequence or tensor of integers"),  # unordered
    ("reorder bool list", lambda c: c.reorder([True]), TypeError, "integers"),
    ("reorder out of range", lambda c: c.reorder([3]), CacheIndexError, "out of range"),
]


@pytest.mark.parametrize("call,exc,match", [p[1:] for p in BAD_CALLS], ids=[p[0] for p in BAD_CALLS])
def test_bad_input_raises_and_leaves_cache_unchanged(call, exc, match):
    cache = ContiguousKVCache(LAYERS, HEADS, DIM, batch=2, capacity=4)
    fill(cache, 3, seed=5)
    before = snapshot(cache)
    with pytest.raises(exc, match=match):
        call(cache)
    assert_unchanged(cache, before)


# ------------------------------------------------------- property: vs torch.cat

class ReferenceCache:
    """The obvious implementation: per-layer tensors grown with torch.cat."""

    def __init__(self, layers, batch):
        self.k = [torch.zeros(batch, HEADS, 0, DIM) for _ in range(layers)]
        self.v = [torch.zeros(batch, HEADS, 0, DIM) for _ in range(layers)]

    def __len__(self):
        return self.k[-1].shape[2]

    def update(self, layer, k, v):
        self.k[layer] = torch.cat([self.k[layer], k], dim=2)
        self.v[layer] = torch.cat([self.v[layer], v], dim=2)
        return self.k[layer], self.v[layer]

    def crop(self, length):
        self.k = [t[:, :, :length] for t in self.k]
        self.v = [t[:, :, :length] for t in self.v]

    def select(self, idx):
        self.k = [t[idx] for t in self.k]
        self.v = [t[idx] for t in self.v]


@settings(max_examples=60, deadline=None)
@given(data=st.data(), layers=st.integers(1, 3), batch=st.integers(1, 3), capacity=st.integers(1, 6))
def test_random_operations_match_reference(data, layers, batch, capacity):
    cache = ContiguousKVCache(layers, HEADS, DIM, batch=batch, capacity=capacity)
    ref = ReferenceCache(layers, batch)
    seed = 0
    for _ in range(data.draw(st.integers(1, 12), label="steps")):
        op = data.draw(st.sampled_from(["update", "update", "update one layer", "crop", "select"]), label="op")
        if op.startswith("update"):
            n = data.draw(st.integers(1, 5), label="n")
            # a full forward pass writes every layer; a partial one leaves layers at different lengths
            targets = range(layers) if op == "update" else [data.draw(st.integers(0, layers - 1), label="layer")]
            for layer in targets:
                seed += 1
                k, v = kv(n, batch=cache.batch, seed=seed)
                got_k, got_v = cache.update(layer, k, v)
                exp_k, exp_v = ref.update(layer, k, v)
                assert torch.equal(got_k, exp_k) and torch.equal(got_v, exp_v)
        elif op == "crop":
            length = data.draw(st.integers(0, len(ref)), label="crop to")
            cache.crop(length)
            ref.crop(length)
        else:
            idx = data.draw(st.lists(st.integers(0, cache.batch - 1), min_size=1, max_size=4), label="select")
            cache.select(idx)
            ref.select(idx)
        assert len(cache) == len(ref) and cache.batch == ref.k[0].shape[0]
        assert cache.capacity >= len(cache)
        for layer in range(layers):
            assert torch.equal(cache.keys(layer), ref.k[layer])
            assert torch.equal(cache.values(layer), ref.v[layer])
