"""GGUF weight formats held as they are (model/qweight.py, qmatvec.c, qlinear.py): the repacked blocks widen to
exactly the values gguf.quants gives; the integer kernel equals a float64 evaluation of its own arithmetic
(8-bit activations) to float32 rounding and stays near the float product; the AVX2 and portable builds agree;
QuantLinear's float-activation, sliced and F16 paths equal the dequantized matmul."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType, quants

from conftest import build_portable, build_without_avx512
from kvcache.model import qweight
from kvcache.model.qlinear import QuantEmbedding, QuantLinear
from kvcache.model.qweight import FORMAT_CODES, QuantWeight

needs_kernel = pytest.mark.skipif(qweight.library() is None, reason="the kernel did not build here")
QUANTIZED = list(FORMAT_CODES)


def weights(n, k, seed=0):
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("fmt", [*QUANTIZED, "F16"])
@pytest.mark.parametrize("k", [64, 128, 192, 576])
def test_blocks_widen_to_exactly_the_values_gguf_gives(fmt, k):
    w = weights(13, k, k)
    raw = quants.quantize(w.numpy(), GGMLQuantizationType[fmt])
    want = quants.dequantize(raw, GGMLQuantizationType[fmt])
    q = QuantWeight.from_ggml(raw.view(np.uint8), fmt, (13, k))
    assert q.nbytes == raw.nbytes  # held at the file's own size
    assert np.array_equal(q.dequantize().numpy(), want)
    assert np.array_equal(q.dequantize(torch.tensor([[4, 0], [12, 4]])).numpy(), want[[[4, 0], [12, 4]]])
    assert np.array_equal(q.dequantize(slice(3, 9)).numpy(), want[3:9])
    if fmt != "F16":
        assert np.array_equal(q._dequantize_numpy(None).numpy(), want)  # the path without a compiler


def test_bad_shapes_and_rows_are_refused():
    with pytest.raises(ValueError, match="multiple of 64"):
        QuantWeight.quantize(weights(4, 96), "Q8_0")
    q = QuantWeight.quantize(weights(4, 64), "Q4_1")
    with pytest.raises(IndexError, match="out of range"):
        q.dequantize(torch.tensor([4]))


def quantized_activations(x):
    """llama.cpp's per-block 8-bit activations (round half away from zero), as float64: xq and dx."""
    blocks = x.double().reshape(x.shape[0], -1, 32)
    d = blocks.abs().amax(-1, keepdim=True) / 127
    inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    scaled = blocks * inv
    xq = torch.sign(scaled) * torch.floor(scaled.abs() + 0.5)
    return xq, d


def kernel_reference(x, q):
    """What kv_qlinear computes, in float64: the dequantized weights times the quantized activations."""
    xq, d = quantized_activations(x)
    return (xq * d).reshape(x.shape) @ q.dequantize().double().T


def call(lib, x, q, bias=None):
    out = torch.empty(x.shape[0], q.shape[0])
    mins = None if q.mins is None else q.mins.data_ptr()
    status = lib.kv_qlinear(x.data_ptr(), q.codes.data_ptr(), q.scales.data_ptr(), mins, FORMAT_CODES[q.fmt],
                            None if bias is None else bias.data_ptr(), out.data_ptr(), x.shape[0], q.shape[0],
                            q.shape[1])
    assert status == 0
    return out


@needs_kernel
@pytest.mark.parametrize("fmt", QUANTIZED)
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 16, 17, 40])
@pytest.mark.parametrize("n, k", [(1, 64), (7, 192), (37, 576), (130, 1536)])
def test_the_kernel_computes_its_arithmetic_to_float32_rounding(fmt, rows, n, k):
    g = torch.Generator().manual_seed(rows * 100 + n + k)
    x, bias = torch.randn(rows, k, generator=g), torch.randn(n, generator=g)
    q = QuantWeight.quantize(torch.randn(n, k, generator=g), fmt)
    got = call(qweight.library(), x, q, bias)
    want = kernel_reference(x, q) + bias.double()
    scale = (x.abs().double() @ q.dequantize().abs().double().T).max().item()
    assert (got.double() - want).abs().max().item() <= 2e-6 * scale * k ** 0.5 + 1e-6
    exact = F.linear(x.double(), q.dequantize().double(), bias.double())  # 8-bit activations: a small error
    assert (got.double() - exact).abs().max().item() <= 0.02 * scale


@needs_kernel
def test_out_of_range_arguments_are_refused():
    lib, q = qweight.library(), QuantWeight.quantize(weights(4, 64), "Q4_1")
    x, out = torch.randn(17, 64), torch.empty(17, 4)
    args = (q.codes.data_ptr(), q.scales.data_ptr(), q.mins.data_ptr())
    assert lib.kv_qlinear(x.data_ptr(), *args, 3, None, out.data_ptr(), 0, 4, 64) == 2  # no rows
    assert lib.kv_qlinear(x.data_ptr(), *args, 3, None, out.data_ptr(), 1, 4, 96) == 2  # K not a multiple of 64
    assert lib.kv_qlinear(x.data_ptr(), *args, 9, None, out.data_ptr(), 1, 4, 64) == 2  # no such format
    assert lib.kv_qlinear(x.data_ptr(), args[0], args[1], None, 3, None, out.data_ptr(), 1, 4, 64) == 2  # no mins


@needs_kernel
@pytest.mark.parametrize("variant", [build_without_avx512, build_portable], ids=["avx2", "portable"])
def test_other_builds_agree_with_the_native_one(tmp_path, variant):
    avx2 = qweight.declare(variant(qweight.SOURCE, tmp_path))
    for fmt in QUANTIZED:
        for rows, k in [(1, 576), (5, 192), (16, 1536)]:
            x, q = torch.randn(rows, k), QuantWeight.quantize(weights(45, k, rows), fmt)
            a, b = call(avx2, x, q), call(qweight.library(), x, q)
            scale = (x.abs() @ q.dequantize().abs().T).max().item()
            assert (a - b).abs().max().item() <= 2e-6 * scale * k ** 0.5
            out = torch.empty(3, k)
            mins = None if q.mins is None else q.mins.data_ptr()
            idx = torch.tensor([44, 0, 7])
            assert avx2.kv_qdequant(q.codes.data_ptr(), q.scales.data_ptr(), mins, FORMAT_CODES[fmt], idx.data_ptr(),
                                    0, 3, k, out.data_ptr()) == 0
            assert torch.equal(out, q.dequantize(idx))


@pytest.mark.parametrize("fmt", [*QUANTIZED, "F16"])
@pytest.mark.parametrize("rows", [1, 3, 16, 40])
def test_quant_linear_float_paths_equal_the_dequantized_matmul(fmt, rows, monkeypatch):
    monkeypatch.setattr("kvcache.model.qlinear.SLICE_FLOATS", 64 * 192)  # several slices, a short last one
    q, bias = QuantWeight.quantize(weights(200, 192), fmt), torch.randn(200)
    layer = QuantLinear(q, bias=True, float_activations=True)
    layer.bias.copy_(bias)
    x = torch.randn(2, rows, 192)
    with torch.no_grad():
        got = layer(x)
    want = F.linear(x.double(), q.dequantize().double(), bias.double())
    assert got.shape == (2, rows, 200) and got.dtype == torch.float32
    assert (got.double() - want).abs().max().item() <= 1e-4


@needs_kernel
def test_quant_linear_runs_the_integer_kernel_and_a_row_in_a_batch_gets_its_single_row_result():
    q = QuantWeight.quantize(weights(64, 128), "Q8_0")
    layer, x = QuantLinear(q), torch.randn(1, 37, 128)
    with torch.no_grad():
        batch = layer(x)
        assert torch.allclose(batch.double().reshape(37, 64), kernel_reference(x.reshape(37, 128), q),
                              rtol=1e-5, atol=1e-4)
        for i in (0, 15, 16, 36):
            assert torch.equal(layer(x[:, i:i + 1]), batch[:, i:i + 1])


def test_quant_embedding_looks_up_widened_rows():
    q = QuantWeight.quantize(weights(50, 64), "Q4_0")
    ids = torch.tensor([[3, 49, 3]])
    assert torch.equal(QuantEmbedding(q)(ids), q.dequantize()[ids])
    with pytest.raises(IndexError):
        QuantEmbedding(q)(torch.tensor([50]))
