"""The compiled decoder-layer glue (model/glue.py, glue.c): each step equals its PyTorch form to float32 rounding,
a row of a batch gets exactly its single-row result, the portable build agrees, and a model with the glue gives
the logits and greedy tokens of the model without it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cache_contract import tiny_llama
from conftest import build_portable
from kvcache.model import glue
from kvcache.model.rope import Rope

needs_kernel = pytest.mark.skipif(glue.library() is None, reason="the kernel did not build here")


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@needs_kernel
@pytest.mark.parametrize("rows", [1, 3, 70])  # 70: split over the threads
@pytest.mark.parametrize("dim", [8, 576, 100])
def test_rmsnorm_with_and_without_the_residual_add(rows, dim):
    x, delta, w = randn(1, rows, dim, seed=1) * 3, randn(1, rows, dim, seed=2), randn(dim, seed=3)
    h, y = glue.rmsnorm(x, w, 1e-5)
    assert h is x or torch.equal(h, x)
    torch.testing.assert_close(y, F.rms_norm(x, (dim,), w, 1e-5), rtol=2e-6, atol=2e-6)
    h, y = glue.rmsnorm(x, w, 1e-5, delta)
    assert torch.equal(h, x + delta)
    torch.testing.assert_close(y, F.rms_norm(x + delta, (dim,), w, 1e-5), rtol=2e-6, atol=2e-6)
    for i in (0, rows - 1):  # a row alone gets exactly what it got in the batch
        assert torch.equal(glue.rmsnorm(x[:, i:i + 1], w, 1e-5, delta[:, i:i + 1])[1], y[:, i:i + 1])


def synthetic_rope(positions, dim, batch=None):
    angles = torch.arange(positions).float()[:, None] * (0.7 ** torch.arange(dim // 2).float())[None]
    angles = torch.cat((angles, angles), -1)
    cos, sin = angles.cos(), angles.sin()
    if batch is not None:  # per-sequence positions (the engine's rows): (batch, 1, seq, d)
        cos, sin = cos.expand(batch, 1, positions, dim) * 1.0, sin.expand(batch, 1, positions, dim) * 1.0
        cos, sin = cos + 0.01 * randn(*cos.shape, seed=5), sin + 0.01 * randn(*sin.shape, seed=6)
    return Rope(cos, sin)


@needs_kernel
@pytest.mark.parametrize("batch_tables", [False, True])
@pytest.mark.parametrize("batch, seq", [(1, 1), (2, 5), (1, 80)])
def test_rope_in_place_equals_rotate_heads_last(batch_tables, batch, seq):
    heads, kv_heads, dim = 4, 2, 16
    rope = synthetic_rope(seq, dim, batch if batch_tables else None)
    qkv = randn(batch, seq, (heads + 2 * kv_heads) * dim, seed=seq)
    qk = qkv[..., :(heads + kv_heads) * dim].view(batch, seq, heads + kv_heads, dim)
    want = rope.rotate_heads_last(qk)
    untouched = qkv[..., (heads + kv_heads) * dim:].clone()
    glue.rope_in_place(qkv, heads + kv_heads, dim, rope.cos_heads_last, rope.sin_heads_last)
    torch.testing.assert_close(qk, want, rtol=1e-6, atol=1e-6)
    assert torch.equal(qkv[..., (heads + kv_heads) * dim:], untouched)  # the values are left alone


@needs_kernel
@pytest.mark.parametrize("rows", [1, 70])
def test_silu_mul(rows):
    h = randn(1, rows, 2 * 96, seed=rows) * 4
    gate, up = h.chunk(2, -1)
    got = glue.silu_mul(h)
    torch.testing.assert_close(got, F.silu(gate) * up, rtol=2e-6, atol=2e-6)
    assert torch.equal(glue.silu_mul(h[:, :1]), got[:, :1])


@needs_kernel
def test_out_of_range_arguments_are_refused():
    lib, x = glue.library(), torch.zeros(4, 8)
    assert lib.kv_rmsnorm(x.data_ptr(), x.data_ptr(), x.data_ptr(), 1e-5, None, x.data_ptr(), 4, 8) == 2  # no h
    assert lib.kv_rmsnorm(x.data_ptr(), None, x.data_ptr(), 1e-5, None, x.data_ptr(), 4, 0) == 2
    assert lib.kv_rope_rows(x.data_ptr(), 4, 8, 1, 7, x.data_ptr(), x.data_ptr(), 1) == 2  # odd head_dim
    assert lib.kv_rope_rows(x.data_ptr(), 4, 4, 1, 8, x.data_ptr(), x.data_ptr(), 1) == 2  # rows overlap
    assert lib.kv_silu_mul(x.data_ptr(), x.data_ptr(), -1, 4) == 2


@needs_kernel
def test_the_portable_build_agrees(tmp_path):
    other = glue.declare(build_portable(glue.SOURCE, tmp_path))
    lib = glue.library()
    x, w, delta = randn(5, 576, seed=1), randn(576, seed=2), randn(5, 576, seed=3)
    outs = []
    for build in (lib, other):
        h, y = torch.empty(5, 576), torch.empty(5, 576)
        assert build.kv_rmsnorm(x.data_ptr(), delta.data_ptr(), w.data_ptr(), 1e-5, h.data_ptr(),
                                y.data_ptr(), 5, 576) == 0
        outs.append(y)
    torch.testing.assert_close(outs[0], outs[1], rtol=2e-6, atol=2e-6)


@needs_kernel
def test_a_model_with_the_glue_equals_the_model_without(monkeypatch):
    from kvcache.generation.generate import generate

    model = tiny_llama()
    ids = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        fused = model(ids)
        tokens = generate(model, ids[0].tolist(), 12, stop_token_ids=[])
        monkeypatch.setattr(glue, "ENABLED", False)
        plain = model(ids)
        assert generate(model, ids[0].tolist(), 12, stop_token_ids=[]) == tokens
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
