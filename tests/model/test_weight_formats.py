"""Models whose matrices stay in a GGUF format (weight_formats.py): dtype="auto" keeps a GGUF's formats, an
explicit format quantizes every matrix; with float activations the logits equal the dequantized-weight model and
greedy tokens match; with 8-bit activations they stay close and the engine equals single-stream generate."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("gguf")
from gguf_files import random_hf_model, write_gguf  # noqa: E402
from kvcache.engine.llm import LLM  # noqa: E402
from kvcache.engine.sequence import SamplingParams  # noqa: E402
from kvcache.generation.generate import generate  # noqa: E402
from kvcache.model.linear import Linear  # noqa: E402
from kvcache.model.loader import load_model, model_dtype  # noqa: E402
from kvcache.model.qlinear import QuantLinear  # noqa: E402
from kvcache.model.qweight import QuantWeight  # noqa: E402

IDS = [258, 5, 84, 104, 101, 32, 256, 257, 99, 97, 116, 259, 10, 49, 50]
FORMATS = ["Q8_0", "Q4_0", "Q4_1", "F16"]


@pytest.fixture(scope="module", params=FORMATS)
def gguf_file(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / f"llama-{request.param}.gguf"
    write_gguf(path, random_hf_model("llama"), request.param)
    return request.param, path


def logits(model, ids=IDS):
    with torch.inference_mode():
        return model(torch.tensor([ids]))


def test_auto_keeps_every_matrix_of_a_gguf_in_its_format(gguf_file):
    fmt, path = gguf_file
    model = load_model(path, dtype="auto")
    assert set(model.weight_formats()) == {fmt} and model.dtype == torch.float32
    assert fmt in model.load_note and "the file's formats" in model.load_note
    assert not any(isinstance(m, Linear) for m in model.modules())  # no float copy of any matrix


def test_float_activations_equal_the_dequantized_model(gguf_file):
    fmt, path = gguf_file
    held, dense = load_model(path, dtype="auto", float_activations=True), load_model(path, dtype="float32")
    torch.testing.assert_close(logits(held), logits(dense), rtol=1e-4, atol=1e-4)
    assert generate(held, IDS, 12) == generate(dense, IDS, 12)


@pytest.mark.parametrize("fmt", ["Q8_0", "Q4_0", "Q4_1"])
def test_8bit_activations_stay_close_and_the_engine_equals_generate(tmp_path, fmt):
    path = tmp_path / "m.gguf"
    hf = random_hf_model("llama")
    # Norm weights near one, not exactly one: with ones, a Q4_0 embedding's rows (16 levels per block) land exactly
    # on the 8-bit activation grid's rounding ties, where the norm's last bit decides a code and the error bound
    # then holds by luck (a flipped tie moved the max logit error from 3.4% to 5.1% here).
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.95, 1.05, generator=torch.Generator().manual_seed(len(name)))
    write_gguf(path, hf, fmt)
    held, dense = load_model(path, dtype="auto"), load_model(path, dtype="float32")
    a, b = logits(held), logits(dense)
    assert (a - b).abs().max() <= 0.05 * b.abs().max()  # 8-bit activations: a small, bounded error
    prompts = [IDS, IDS[:5], IDS[3:], IDS[:9] * 3]
    params = SamplingParams(max_new_tokens=10, ignore_eos=True)
    outputs = LLM(held, num_blocks=64, block_size=8).generate(prompts, params)
    assert [o.token_ids for o in outputs] == [generate(held, p, 10, stop_token_ids=[]) for p in prompts]


def test_an_explicit_format_quantizes_a_float_folder(llama_dir):
    """Every matrix whose rows split into blocks of 64 is held as Q4_1; the down projection (rows of 96) stays
    float, said in the load note; with float activations the model equals the float one with its matrices
    replaced by their quantized values."""
    held = load_model(llama_dir, dtype="q4_1", float_activations=True)
    dense = load_model(llama_dir, pack=False)
    assert set(held.weight_formats()) == {"Q4_1", "float32"}
    assert "2 matrices kept float" in held.load_note
    assert isinstance(held.layers[0].mlp.down, Linear) and isinstance(held.layers[0].mlp.up, QuantLinear)
    with torch.no_grad():
        for name, module in dense.named_modules():
            if isinstance(module, Linear) and module.in_features % 64 == 0:
                module.weight.copy_(QuantWeight.quantize(module.weight, "Q4_1").dequantize())
        dense.embed.weight.copy_(QuantWeight.quantize(dense.embed.weight, "Q4_1").dequantize())
    ids = [1, 5, 9, 33, 70, 2, 8]
    torch.testing.assert_close(logits(held, ids), logits(dense, ids), rtol=1e-4, atol=1e-4)


def test_a_tied_head_shares_the_embeddings_blocks(tmp_path):
    path = tmp_path / "tied.gguf"
    write_gguf(path, random_hf_model("llama", tie=True), "Q8_0")
    model = load_model(path, dtype="auto", float_activations=True)
    assert model.lm_head.qweight is model.embed.qweight
    per_layer = 64 * 64 + 2 * 32 * 64 + 64 * 64 + 3 * 128 * 64  # q, k, v, o, gate, up, down
    values = 2 * per_layer + 260 * 64  # two layers and one embedding table: the tied head is not counted again
    assert model.weight_formats() == {"Q8_0": values // 32 * 34}
    dense = load_model(path, dtype="float32")
    torch.testing.assert_close(logits(model), logits(dense), rtol=1e-4, atol=1e-4)


def test_a_float16_folder_loads_as_f16_weights_under_auto(tmp_path):
    from conftest import save_hf_llama

    save_hf_llama(tmp_path / "fp32", intermediate_size=128).half().save_pretrained(tmp_path)
    model = load_model(tmp_path, dtype="auto")
    assert set(model.weight_formats()) == {"F16"} and "F16" in model.load_note


def test_format_names_are_accepted_and_bad_ones_named():
    assert load_model(None, dtype="Q8_0").dtype == torch.float32  # the shipped model, every matrix in Q8_0
    with pytest.raises(ValueError, match="Q4_1"):
        model_dtype("q5_k")


def test_a_held_model_exports_its_float_values(tmp_path):
    from kvcache.model.export import save_hf_checkpoint

    held = load_model(None, dtype="Q4_0", float_activations=True)
    save_hf_checkpoint(held, tmp_path)
    ids = [1, 5, 9, 33, 70]
    torch.testing.assert_close(logits(load_model(tmp_path), ids), logits(held, ids), rtol=1e-4, atol=1e-4)
