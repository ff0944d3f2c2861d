"""The decode matmul kernel (model/matvec.c): exact to float32 rounding against a float64 reference for every
row count, tail and weight dtype; the AVX2 build agrees with the AVX-512 one; ``Linear`` takes it only below
the crossover; models give the same logits and greedy tokens with it and without it."""

from __future__ import annotations

import pytest
import torch

from conftest import build_portable, build_without_avx512
from kvcache.generation.generate import generate
from kvcache.model import linear, matvec
from kvcache.model.shapes import random_model

needs_kernel = pytest.mark.skipif(matvec.library() is None, reason="the kernel did not build here")


def reference(x, w, b):
    out = x.double() @ w.double().T
    return out if b is None else out + b.double()


def call(lib, x, w, b):
    n, k = w.shape
    out = torch.empty(x.shape[0], n)
    status = lib.kv_linear(x.data_ptr(), w.data_ptr(), matvec.WEIGHT_DTYPES[w.dtype], None if b is None else
                           b.data_ptr(), out.data_ptr(), x.shape[0], n, k)
    assert status == 0
    return out


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 8, 9, 16])
@pytest.mark.parametrize("n, k", [(1, 1), (7, 5), (37, 48), (64, 576), (130, 1000)])
def test_the_kernel_is_exact_to_float32_rounding(dtype, rows, n, k):
    g = torch.Generator().manual_seed(rows * 1000 + n + k)
    x, w, b = torch.randn(rows, k, generator=g), torch.randn(n, k, generator=g).to(dtype), torch.randn(n, generator=g)
    got = call(matvec.library(), x, w, b)
    want = reference(x, w, b)  # the bfloat16 weights widened exactly: the same products
    bound = 1e-6 * (x.abs().double() @ w.abs().double().T).max().item() * max(1, k) ** 0.5 + 1e-6
    assert (got.double() - want).abs().max().item() <= bound


@needs_kernel
def test_out_of_range_arguments_are_refused():
    x, w = torch.randn(17, 8), torch.randn(4, 8)
    assert matvec.library().kv_linear(x.data_ptr(), w.data_ptr(), 0, None, torch.empty(17, 4).data_ptr(), 17, 4, 8) == 2


@needs_kernel
@pytest.mark.parametrize("variant", [build_without_avx512, build_portable], ids=["avx2", "portable"])
def test_other_builds_agree_with_the_native_one(tmp_path, variant):
    avx2 = variant(matvec.SOURCE, tmp_path)
    avx2.kv_linear.argtypes = matvec.library().kv_linear.argtypes
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for rows in (1, 3, 6):
            x, w = torch.randn(rows, 200, generator=g), torch.randn(45, 200, generator=g).to(dtype)
            torch.testing.assert_close(call(avx2, x, w, None), call(matvec.library(), x, w, None), rtol=1e-5,
                                       atol=1e-5)


@needs_kernel
def test_linear_takes_the_kernel_only_below_the_crossover():
    layer = linear.Linear(64, 32).eval()
    for rows, packed, dtype, expected in [(1, True, torch.float32, True), (2, True, torch.float32, False),
                                          (4, False, torch.float32, True), (5, False, torch.float32, False),
                                          (4, False, torch.bfloat16, True), (5, False, torch.bfloat16, False),
                                          (1, False, torch.float16, False)]:
        x = torch.randn(rows, 64).to(dtype)
        assert matvec.serves(x, layer.weight.to(dtype), packed) is expected, (rows, packed, dtype)
    assert not matvec.serves(torch.randn(1, 64, dtype=torch.bfloat16), layer.weight)  # mixed dtypes: oneDNN


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_model_gives_the_same_logits_and_tokens_with_and_without_it(monkeypatch, dtype):
    model = random_model("tiny-llama").to(dtype)
    model.pack_weights()
    prompt = list(range(3, 40))
    runs = {}
    for use in (False, True):
        monkeypatch.setattr(linear, "DECODE_KERNEL", use)
        with torch.inference_mode():
            logits = model(torch.tensor([prompt[:1]])).float()  # one row: the kernel's path when on
        runs[use] = logits, generate(model, prompt, 24, stop_token_ids=[])
    (off_logits, off_tokens), (on_logits, on_tokens) = runs[False], runs[True]
    tolerance = 1e-4 if dtype == torch.float32 else 0.05  # bf16: one rounding of each output, not another sum
    assert (on_logits - off_logits).abs().max().item() <= tolerance * max(1.0, off_logits.abs().max().item())
    assert on_tokens == off_tokens


def test_without_the_kernel_linear_keeps_onednn(monkeypatch):
    monkeypatch.setattr(matvec, "library", lambda: None)
    layer = linear.Linear(16, 8).eval()
    x = torch.randn(1, 16)
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))
