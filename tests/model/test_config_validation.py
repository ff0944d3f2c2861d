"""Every config.json field we read is type- and range-checked at load; the error names the key, the value
and the file. Property-based: any mutation of a valid config either loads or fails with such a ValueError."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvcache.model.config import ModelConfig

LLAMA = {"model_type": "llama", "vocab_size": 101, "hidden_size": 64, "intermediate_size": 96,
         "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 2, "max_position_embeddings": 256,
         "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False, "bos_token_id": 0,
         "eos_token_id": 100}
GPT2 = {"model_type": "gpt2", "vocab_size": 97, "n_positions": 256, "n_embd": 64, "n_layer": 2, "n_head": 4,
        "layer_norm_epsilon": 1e-5, "eos_token_id": 96}

BAD = st.one_of(st.integers(-3, 0), st.just(-1.5), st.just(float("nan")), st.just("8"), st.just([1, 2]),
                st.just({}), st.just(True), st.none(), st.integers(10**9, 10**10))


def test_valid_configs_load():
    assert ModelConfig.from_hf(LLAMA).num_kv_heads == 2 and ModelConfig.from_hf(GPT2).head_dim == 16


@pytest.mark.parametrize("key,value,words", [
    ("num_hidden_layers", 0, "'num_hidden_layers' (num_layers) = 0 must be an integer >= 1"),
    ("rope_theta", 0, "'rope_theta' = 0 must be > 0"),
    ("rms_norm_eps", -1e-6, "'rms_norm_eps' (norm_eps) = -1e-06 must be >= 0"),
    ("hidden_size", 60, "'hidden_size' = 60 must be a multiple of num_attention_heads = 8"),
    ("tie_word_embeddings", "no", "'tie_word_embeddings' = 'no' must be true or false"),
    ("eos_token_id", "</s>", "'eos_token_id' = '</s>' must be null, a token id"),
    ("num_key_value_heads", 3, "num_heads (8) must be a multiple of num_kv_heads (3)"),
])
def test_each_bad_value_is_named(tmp_path, key, value, words):
    (tmp_path / "config.json").write_text(json.dumps({**LLAMA, key: value}))
    with pytest.raises(ValueError) as info:
        ModelConfig.from_file(tmp_path)
    assert str(info.value).startswith(str(tmp_path / "config.json")) and words in str(info.value)


def test_a_file_that_is_not_a_json_object(tmp_path):
    for text, words in [("[1, 2]", "must hold a JSON object, got list"), ("{oops", "not valid JSON"),
                        ("\xff\xfe", "not valid JSON")]:
        (tmp_path / "config.json").write_text(text, encoding="latin-1")
        with pytest.raises(ValueError, match=words):
            ModelConfig.from_file(tmp_path)


@settings(max_examples=300)
@given(base=st.sampled_from([LLAMA, GPT2]), data=st.data())
def test_any_mutation_loads_or_names_the_problem(base, data):
    key = data.draw(st.sampled_from(sorted(k for k in base if k != "model_type")))
    value = data.draw(BAD)
    config = {**base, key: value}
    try:
        ModelConfig.from_hf(config)
    except ValueError as exc:  # never a TypeError, ZeroDivisionError, KeyError, ...
        assert key in str(exc) or "missing the key" in str(exc) or "multiple of" in str(exc), str(exc)
