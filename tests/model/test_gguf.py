"""GGUF loading: logits equal transformers' GGUF loader on the same file, for every storage type we write
and for the real model; clear errors for files we cannot read."""

from __future__ import annotations

import shutil

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gguf")
from gguf_files import random_hf_model, write_gguf  # noqa: E402
from kvcache.generation.generate import generate  # noqa: E402
from kvcache.model.gguf import GGUFError, find_gguf, read_gguf, save_as_hf  # noqa: E402
from kvcache.model.loader import load_model  # noqa: E402

IDS = [258, 5, 84, 104, 101, 32, 256, 257, 99, 97, 116, 259, 10, 49, 50]


def hf_from_gguf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


def logits_both(ours, theirs, ids):
    with torch.inference_mode():
        out = theirs(torch.tensor([ids]))
        return ours(torch.tensor([ids])), getattr(out, "logits", out)


@pytest.mark.parametrize("qtype", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_llama_gguf_matches_transformers(tmp_path, qtype):
    """Same file, two loaders: dequantization and llama.cpp's Q/K permutation undone exactly."""
    path = tmp_path / f"llama-{qtype}.gguf"
    write_gguf(path, random_hf_model("llama"), qtype)
    ours, theirs = logits_both(load_model(path), hf_from_gguf(path), IDS)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_permutation_matters(tmp_path):
    """The unpermute is what makes it right: the original HF model equals the F32 GGUF's, and a GGUF whose
    Q/K rows were NOT permuted by the writer loads into a different model."""
    hf = random_hf_model("llama")
    path = tmp_path / "llama.gguf"
    write_gguf(path, hf, "F32")
    ours, theirs = logits_both(load_model(path), hf, IDS)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    unpermuted = tmp_path / "unpermuted.gguf"
    write_gguf(unpermuted, hf, "F32", permute=False)
    assert not torch.allclose(*logits_both(load_model(unpermuted), hf, IDS), atol=1e-3)


def test_qwen2_gguf_with_biases(tmp_path):
    path = tmp_path / "qwen2.gguf"
    hf = random_hf_model("qwen2")
    write_gguf(path, hf, "Q8_0")
    ours, theirs = logits_both(load_model(path), hf_from_gguf(path), IDS)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_tied_embeddings_and_tokenizer(tmp_path):
    path = tmp_path / "tied.gguf"
    write_gguf(path, random_hf_model("llama", tie=True), "F32")
    model = load_model(path)
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.embed.weight
    tok = model.tokenizer
    assert tok.encode("<|im_start|> the cat<|im_end|>") == [258, 257, 101] + tok.encode(" cat") + [259]
    assert tok.encode("<|im_start|>") == [258] and tok.encode(" th") == [257]
    assert tok.decode(tok.encode("héllo wörld")) == "héllo wörld"
    assert "<|im_start|>user" in tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert tok.eos_token_ids == [259]


def test_folder_holding_a_gguf_and_conversion(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    write_gguf(src / "m.gguf", random_hf_model("llama"), "Q8_0")
    direct = load_model(src)  # a folder with one .gguf and no config.json
    converted = load_model(save_as_hf(read_gguf(src / "m.gguf"), tmp_path / "hf"))
    torch.testing.assert_close(*logits_both(direct, converted, IDS))
    assert generate(direct, IDS, 16, stop_token_ids=[]) == generate(converted, IDS, 16, stop_token_ids=[])
    shutil.copy(src / "m.gguf", src / "n.gguf")
    with pytest.raises(GGUFError, match="several GGUF files"):
        find_gguf(src)


# ------------------------------------------------------------ errors name the problem

def test_not_a_gguf(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"not a model at all")
    with pytest.raises(GGUFError, match="not a GGUF file"):
        load_model(bad)


def test_truncated(tmp_path):
    path = tmp_path / "full.gguf"
    write_gguf(path, random_hf_model("llama"), "Q4_0")
    data = path.read_bytes()
    for cut in (12, 200, len(data) // 2, len(data) - 100):  # the last cut is inside the last tensor
        short = tmp_path / f"cut{cut}.gguf"
        short.write_bytes(data[:cut])
        with pytest.raises(GGUFError, match="truncated or corrupt"):
            load_model(short)


@pytest.mark.parametrize("skip, message", [("block_count", "llama.block_count"),
                                           ("tokens", "tokenizer.ggml.tokens"),
                                           ("rms_eps", "llama.attention.layer_norm_rms_epsilon")])
def test_missing_metadata(tmp_path, skip, message):
    path = tmp_path / "m.gguf"
    write_gguf(path, random_hf_model("llama"), "F32", skip=(skip,))
    with pytest.raises(GGUFError, match=f"missing the metadata key '{message}"):
        load_model(path)


def test_unsupported_architecture_and_tokenizer(tmp_path):
    path = tmp_path / "falcon.gguf"
    write_gguf(path, random_hf_model("llama"), "F32", arch="falcon")
    with pytest.raises(GGUFError, match="unsupported GGUF architecture 'falcon'"):
        load_model(path)
    path = tmp_path / "spm.gguf"
    write_gguf(path, random_hf_model("llama"), "F32", tokenizer_model="llama")
    with pytest.raises(GGUFError, match="unsupported GGUF tokenizer 'llama'"):
        load_model(path)


def test_unsupported_quantization_is_named(tmp_path, monkeypatch):
    import gguf.quants

    path = tmp_path / "m.gguf"
    write_gguf(path, random_hf_model("llama"), "Q4_1")

    def refuse(data, qtype):
        if qtype.name == "Q4_1":
            raise NotImplementedError("no")
        return real(data, qtype)

    real = gguf.quants.dequantize
    monkeypatch.setattr(gguf.quants, "dequantize", refuse)
    with pytest.raises(GGUFError, match="stored as Q4_1"):
        load_model(path)


# ------------------------------------------------------------ the real model

def test_real_gguf_matches_transformers(real_gguf):
    """SmolLM2-135M-Instruct Q4_1: logits allclose to transformers loading the same GGUF; 64 greedy tokens equal."""
    ours, hf = load_model(real_gguf), hf_from_gguf(real_gguf)
    ids = ours.tokenizer.encode(ours.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Explain in detail how a transformer language model works."}]))
    a, b = logits_both(ours, hf, ids)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-4)
    with torch.inference_mode():
        theirs = hf.generate(torch.tensor([ids]), max_new_tokens=64, do_sample=False, min_new_tokens=64)[0, len(ids):]
    assert generate(ours, ids, 64, stop_token_ids=[]) == theirs.tolist()


def test_real_converted_folder_matches_transformers(real_model, hf_real_model):
    ids = real_model.tokenizer.encode("The capital of France is")
    a, b = logits_both(real_model, hf_real_model, ids)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-4)
    chat = real_model.tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    reply = generate(real_model, real_model.tokenizer.encode(chat), 16)
    assert "Paris" in real_model.tokenizer.decode(reply)


def test_real_tokenizer_matches_transformers(real_model_dir, real_model):
    """Our GGUF-built tokenizer against transformers reading the converted tokenizer.json, and llama.cpp's
    'smollm' pre-tokenizer rule: every digit is its own token."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(real_model_dir)
    for text in ["Hello, world!", "def f(x):\n    return x ** 2  # square", "  spaces\t\ttabs\n\n",
                 "<|im_start|>user\nhé wörld<|im_end|>", "year 2024, pi 3.14159"]:
        assert real_model.tokenizer.encode(text) == hf(text, add_special_tokens=False)["input_ids"]
    assert len(real_model.tokenizer.encode("12345")) == 5
