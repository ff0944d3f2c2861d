"""The quantized cache: its format, its kernel against the PyTorch reference, and its attention against an
independent emulation of "each token is quantized once, when it leaves the residual"."""

from __future__ import annotations

import pytest
import torch

import kvcache.caches.prefill_view as prefill_view
from kvcache import native
from kvcache.caches import kernels
from kvcache.caches.quant_ops import (
    QuantFormat,
    QuantizedRows,
    dequantize,
    from_tiles,
    hadamard,
    quantize,
    quantized_partial,
    to_tiles,
)
from kvcache.caches.quantized import QuantizedKVCache


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("per_channel", [False, True])
def test_round_trip_error_is_at_most_half_a_step(bits, symmetric, per_channel):
    fmt = QuantFormat(bits, 16, symmetric, per_channel)
    x = randn(2, 3, 64, 32) * 3
    codes, scale, offset = quantize(x, fmt)
    assert codes.dtype == torch.uint8 and codes.shape[-1] == 32 * bits // 8
    assert scale.dtype == offset.dtype == torch.float16
    back = dequantize(codes, scale, offset, fmt)
    step = scale.float().repeat_interleave(16, -2 if per_channel else -1)
    assert ((back - x).abs() <= step * 0.5 + 1e-3 * x.abs().amax()).all()


def test_int4_packs_even_channels_in_the_low_nibble():
    fmt = QuantFormat(4, 4)
    x = torch.tensor([[[[0.0, 15.0, 3.0, 12.0]]]])  # one group: min 0, max 15 -> scale 1, codes = values
    codes, scale, offset = quantize(x, fmt)
    assert codes.flatten().tolist() == [0 | 15 << 4, 3 | 12 << 4]
    assert dequantize(codes, scale, offset, fmt).flatten().tolist() == [0.0, 15.0, 3.0, 12.0]


def test_constant_groups_and_float16_overflow():
    fmt = QuantFormat(8, 8)
    codes, scale, offset = quantize(torch.full((1, 1, 1, 8), 2.5), fmt)
    assert torch.equal(dequantize(codes, scale, offset, fmt), torch.full((1, 1, 1, 8), 2.5))
    with pytest.raises(ValueError, match="float16 range"):
        quantize(torch.linspace(1e5, 2e5, 8).view(1, 1, 1, 8), fmt)  # the offset (min) overflows


def test_tiles_round_trip():
    rows = torch.arange(2 * 48 * 5).reshape(2, 48, 5)
    tiles = to_tiles(rows)
    assert tiles.shape == (2, 3, 5, 16) and torch.equal(from_tiles(tiles), rows)


def test_hadamard_is_orthonormal():
    h = hadamard(64)
    torch.testing.assert_close(h @ h.T, torch.eye(64))
    with pytest.raises(ValueError, match="power-of-two"):
        hadamard(48)


needs_kernel = pytest.mark.skipif(kernels.library() is None, reason="the kernel did not build here")


@needs_kernel
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("count", [1, 17, 300, 513])
@pytest.mark.parametrize("dim,group,query_group", [(64, 32, 3), (32, 16, 1), (128, 64, 4)])
def test_kernel_equals_the_reference(bits, per_channel, count, dim, group, query_group):
    kf, vf = QuantFormat(bits, group, per_channel=per_channel), QuantFormat(bits, group)
    cap = 576 if group != 64 else 576 + 64
    k, v = randn(2, 2, cap, dim, seed=1), randn(2, 2, cap, dim, seed=2)
    kc, ks, ko = quantize(k, kf)
    vc, vs, vo = quantize(v, vf)
    kc = to_tiles(kc)
    if not per_channel:
        ks, ko = to_tiles(ks), to_tiles(ko)
    q = randn(2, 2, query_group, dim, seed=3) * 0.5
    got = kernels.quant_decode(q, kc, ks, ko, vc, vs, vo, count, bits, group, group, per_channel)
    ref_o, ref_m, ref_l = quantized_partial(q, QuantizedRows(kc, ks, ko, vc, vs, vo, count), kf, vf)
    torch.testing.assert_close(got, ref_o / ref_l, atol=1e-5, rtol=1e-5)


def emulate(q, k, v, bits, group, residual, sinks, keys, rotate):
    """Dense attention where query i reads key j quantized iff a decode at length i had quantized it."""
    n, dim = k.shape[2], k.shape[3]
    if rotate:
        h = hadamard(dim)
        q, k = q @ h, k @ h
    kf, vf = QuantFormat(bits, group, per_channel=keys == "channel"), QuantFormat(bits, group)
    body = (n - sinks) // group * group
    dq_k, dq_v = k.clone(), v.clone()
    if body > 0:
        dq_k[:, :, sinks:sinks + body] = dequantize(*quantize(k[:, :, sinks:sinks + body], kf), kf)
        dq_v[:, :, sinks:sinks + body] = dequantize(*quantize(v[:, :, sinks:sinks + body], vf), vf)
    group_q = q.shape[1] // k.shape[1]
    outs = []
    for i in range(n):
        quantized = max(0, i - sinks - residual) // group * group
        pos = torch.arange(i + 1)
        use = ((pos >= sinks) & (pos < sinks + quantized))[None, None, :, None]
        keys_i = torch.where(use, dq_k[:, :, : i + 1], k[:, :, : i + 1]).repeat_interleave(group_q, 1)
        vals_i = torch.where(use, dq_v[:, :, : i + 1], v[:, :, : i + 1]).repeat_interleave(group_q, 1)
        scores = (q[:, :, i:i + 1] @ keys_i.transpose(-1, -2)) / dim ** 0.5
        outs.append(torch.softmax(scores, -1) @ vals_i)
    return torch.cat(outs, 2)


CONFIGS = [dict(bits=8, group=16, residual=0, sinks=0, keys="token", rotate=False),
           dict(bits=8, group=32, residual=20, sinks=3, keys="token", rotate=False),
           dict(bits=4, group=16, residual=5, sinks=0, keys="channel", rotate=False),
           dict(bits=4, group=16, residual=0, sinks=2, keys="token", rotate=True),
           dict(bits=4, group=32, residual=40, sinks=0, keys="channel", rotate=True)]


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("kernel", [True, False])
def test_decode_equals_the_emulation(config, kernel):
    k, v, q = randn(1, 2, 150, 32, seed=1), randn(1, 2, 150, 32, seed=2), randn(1, 4, 150, 32, seed=3)
    cache = QuantizedKVCache(1, 2, 32, capacity=16, kernel=kernel, **config)
    got = torch.cat([cache.attend(0, q[:, :, i:i + 1], k[:, :, i:i + 1], v[:, :, i:i + 1]) for i in range(150)], 2)
    torch.testing.assert_close(got, emulate(q, k, v, **config), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("query_chunk,fused", [(256, True), (16, True), (7, False)])
def test_chunked_forward_gives_every_query_its_decode_view(monkeypatch, config, query_chunk, fused):
    """Whatever the pieces a prompt comes in and however a long piece's queries are split (the banded view's
    query chunks, with and without the fused flash kernel), every query reads what its decode read."""
    monkeypatch.setattr(prefill_view, "CHUNK", query_chunk)
    if not fused:
        monkeypatch.setattr(prefill_view, "_FLASH", None)
    k, v, q = randn(1, 2, 150, 32, seed=1), randn(1, 2, 150, 32, seed=2), randn(1, 4, 150, 32, seed=3)
    cache = QuantizedKVCache(1, 2, 32, capacity=16, **config)
    pieces = [(0, 1), (1, 40), (40, 41), (41, 107), (107, 150)]
    got = torch.cat([cache.attend(0, q[:, :, a:b], k[:, :, a:b], v[:, :, a:b]) for a, b in pieces], 2)
    torch.testing.assert_close(got, emulate(q, k, v, **config), atol=1e-5, rtol=1e-5)


def test_a_residual_longer_than_the_sequence_is_lossless():
    k, v, q = randn(1, 2, 60, 32, seed=1), randn(1, 2, 60, 32, seed=2), randn(1, 4, 60, 32, seed=3)
    cache = QuantizedKVCache(1, 2, 32, bits=4, residual=60)
    got = torch.cat([cache.attend(0, q[:, :, i:i + 1], k[:, :, i:i + 1], v[:, :, i:i + 1]) for i in range(60)], 2)
    torch.testing.assert_close(got, emulate(q, k, v, 4, 32, 60, 0, "token", False), atol=1e-6, rtol=1e-6)
    assert cache.qcounts == [0]


@pytest.mark.parametrize("keys", ["token", "channel"])
def test_crop_never_changes_a_kept_token(keys):
    k, v, q = randn(1, 2, 100, 32, seed=1), randn(1, 2, 100, 32, seed=2), randn(1, 4, 100, 32, seed=3)
    cache = QuantizedKVCache(1, 2, 32, bits=4, group=16, residual=0, keys=keys)
    cache.attend(0, q, k, v)
    cache.attend(0, q[:, :, :1], k[:, :, :1], v[:, :, :1])  # flushes tokens 0..95
    before = {name: t.clone() for name, t in cache.store.tensors.items()}
    cache.crop(41)
    assert (len(cache), cache.qcounts) == (41, [41])
    out = cache.attend(0, q[:, :, :1], k[:, :, 41:42], v[:, :, 41:42])  # token 41 goes to the residual
    assert torch.isfinite(out).all() and cache.qcounts == [41]
    kept = {"kc": from_tiles(cache.store.tensors["kc"][0])[:, :, :41], "vc": cache.store.tensors["vc"][0, :, :, :41],
            "vs": cache.store.tensors["vs"][0, :, :, :41]}
    assert torch.equal(kept["kc"], from_tiles(before["kc"][0])[:, :, :41])
    assert torch.equal(kept["vc"], before["vc"][0, :, :, :41]) and torch.equal(kept["vs"], before["vs"][0, :, :, :41])


def test_sizes_count_codes_scales_and_residual():
    cache = QuantizedKVCache(2, 2, 64, bits=4, group=32, residual=16, capacity=256)
    k, v, q = randn(1, 2, 200, 64), randn(1, 2, 200, 64), randn(1, 2, 200, 64)
    for layer in range(2):
        cache.attend(layer, q, k, v)
        cache.attend(layer, q[:, :, :1], k[:, :, :1], v[:, :, :1])
    quantized = cache.qcounts[0]
    per_token_q = 2 * 2 * (32 + 2 * 2 * 2)  # K and V, 2 heads: 32 code bytes + 2 groups x (scale + offset) fp16
    per_token_fp = 2 * 2 * 64 * 4
    assert cache.used_bytes == 2 * (quantized * per_token_q + (201 - quantized) * per_token_fp)
    assert cache.used_bytes < 201 * 2 * per_token_fp / 3


def test_without_a_compiler_it_falls_back_with_one_notice(monkeypatch, capsys):
    monkeypatch.setattr(native, "_loaded", {})
    monkeypatch.setattr(native, "kernels_dir", lambda: __import__("pathlib").Path("/nonexistent-kvcache/kernels"))
    monkeypatch.setenv("CC", "/nonexistent/gcc")
    assert kernels.library() is None and kernels.library() is None
    assert capsys.readouterr().err.count("kernel unavailable") == 1
    cache = QuantizedKVCache(1, 2, 32, bits=8, group=16, residual=0)
    k, v, q = randn(1, 2, 40, 32), randn(1, 2, 40, 32), randn(1, 4, 40, 32)
    got = torch.cat([cache.attend(0, q[:, :, i:i + 1], k[:, :, i:i + 1], v[:, :, i:i + 1]) for i in range(40)], 2)
    torch.testing.assert_close(got, emulate(q, k, v, 8, 16, 0, 0, "token", False), atol=1e-5, rtol=1e-5)
