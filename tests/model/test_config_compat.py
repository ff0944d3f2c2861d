"""Load what transformers loads: generated configs of every architecture kvcache runs, saved by transformers,
then edited the way real config.json files differ (optional fields absent or null, dtype strings under either
key, unknown keys, special token ids outside the vocabulary).  Whatever transformers loads from the folder,
kvcache must load too and produce the same logits and greedy tokens; what kvcache refuses must be something
transformers refuses as well.
"""

from __future__ import annotations

import json
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from hypothesis import HealthCheck, event, given, reject, settings
from hypothesis import strategies as st

from kvcache.generation.generate import generate
from kvcache.model.hf_config import ACTIVATION_NAMES
from kvcache.model.loader import load_model

FAMILIES = {
    "gpt2": (transformers.GPT2Config, transformers.GPT2LMHeadModel),
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    "deepseek_v2": (transformers.DeepseekV2Config, transformers.DeepseekV2ForCausalLM),
    "deepseek_v3": (transformers.DeepseekV3Config, transformers.DeepseekV3ForCausalLM),
}
PROMPT = [3, 17, 5, 29, 11, 2, 23, 7, 13]
NEW_TOKENS = 8
CASES = {"generated": 0, "compared": 0}  # how many configs were tried, and how many transformers loaded


def rope_parameters(max_positions: int):
    theta = st.sampled_from([10000.0, 500000.0, 1e6])
    original = st.sampled_from([max_positions // 4, max_positions // 2, max_positions])
    return st.one_of(
        st.builds(lambda t: {"rope_type": "default", "rope_theta": t}, theta),
        st.builds(lambda t, f: {"rope_type": "linear", "rope_theta": t, "factor": f}, theta,
                  st.sampled_from([2.0, 4.0])),
        st.builds(lambda t, f: {"rope_type": "dynamic", "rope_theta": t, "factor": f}, theta,
                  st.sampled_from([2.0, 8.0])),
        st.builds(lambda t, f, o: {"rope_type": "llama3", "rope_theta": t, "factor": f, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": o},
                  theta, st.sampled_from([4.0, 8.0]), original),
        st.builds(lambda t, f, o: {"rope_type": "yarn", "rope_theta": t, "factor": f,
                                   "original_max_position_embeddings": o},
                  theta, st.sampled_from([2.0, 4.0]), original),
    )


@st.composite
def special_ids(draw, vocab: int) -> dict:
    """bos/eos as real configs have them: in range, a list, GPT-2's 50256 in a small vocabulary, or absent."""
    choice = st.one_of(st.none(), st.integers(0, vocab - 1), st.just(50256), st.integers(vocab, vocab + 5))
    out = {"bos_token_id": draw(choice), "eos_token_id": draw(choice)}
    if draw(st.booleans()):
        out["eos_token_id"] = draw(st.lists(st.one_of(st.integers(0, vocab - 1), st.just(vocab + 1)),
                                            min_size=1, max_size=3))
    return out


@st.composite
def gpt2_config(draw) -> dict:
    heads, head_dim = draw(st.sampled_from([1, 2, 4])), draw(st.sampled_from([8, 16]))
    vocab = draw(st.integers(40, 130))
    return dict(vocab_size=vocab, n_embd=heads * head_dim, n_head=heads, n_layer=draw(st.integers(1, 2)),
                n_positions=draw(st.sampled_from([32, 64, 128])),
                n_inner=draw(st.sampled_from([None, 24, 64])),
                activation_function=draw(st.sampled_from(["gelu_new", "gelu", "relu", "gelu_pytorch_tanh", "silu"])),
                layer_norm_epsilon=draw(st.sampled_from([1e-5, 1e-6])), tie_word_embeddings=draw(st.booleans()),
                **draw(special_ids(vocab)))


@st.composite
def llama_family_config(draw, model_type: str) -> dict:
    kv_heads = draw(st.sampled_from([1, 2]))
    heads = kv_heads * draw(st.sampled_from([1, 2, 4]))
    head_dim = draw(st.sampled_from([8, 16]))
    hidden = heads * head_dim if draw(st.booleans()) else draw(st.sampled_from([32, 48]))
    positions = draw(st.sampled_from([64, 128, 256]))
    vocab = draw(st.integers(40, 130))
    cfg = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=draw(st.sampled_from([24, 40])),
               num_hidden_layers=draw(st.integers(1, 2)), num_attention_heads=heads, num_key_value_heads=kv_heads,
               head_dim=head_dim, max_position_embeddings=positions, rms_norm_eps=draw(st.sampled_from([1e-5, 1e-6])),
               rope_parameters=draw(rope_parameters(positions)),
               hidden_act=draw(st.sampled_from(["silu", "gelu", "gelu_pytorch_tanh", "relu"])),
               tie_word_embeddings=draw(st.booleans()), **draw(special_ids(vocab)))
    if model_type == "llama":
        cfg.update(attention_bias=draw(st.booleans()), mlp_bias=draw(st.booleans()))
    if model_type == "mistral":
        cfg.update(sliding_window=draw(st.sampled_from([None, 4, 6, 4096])))
    if model_type == "qwen2":
        cfg.update(use_sliding_window=False)
    return cfg


@st.composite
def deepseek_config(draw, model_type: str) -> dict:
    vocab = draw(st.integers(60, 130))
    layers = draw(st.integers(1, 3))
    positions = draw(st.sampled_from([64, 128]))
    cfg = dict(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
               num_attention_heads=draw(st.sampled_from([2, 4])), kv_lora_rank=draw(st.sampled_from([8, 16])),
               qk_rope_head_dim=draw(st.sampled_from([4, 8])), qk_nope_head_dim=draw(st.sampled_from([8, 16])),
               v_head_dim=draw(st.sampled_from([8, 12])), max_position_embeddings=positions,
               q_lora_rank=draw(st.sampled_from([None, 16])), tie_word_embeddings=draw(st.booleans()),
               rope_parameters=draw(st.one_of(
                   st.just({"rope_type": "default", "rope_theta": 10000.0}),
                   st.builds(lambda f, o: {"rope_type": "yarn", "rope_theta": 10000.0, "factor": f,
                                           "original_max_position_embeddings": o, "mscale": 0.707,
                                           "mscale_all_dim": 0.707}, st.sampled_from([2.0, 4.0]),
                             st.sampled_from([16, 32])))),
               **draw(special_ids(vocab)))
    groups = draw(st.sampled_from([1, 2, 4]))
    moe = dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
               n_shared_experts=draw(st.sampled_from([None, 1, 2])),
               first_k_dense_replace=draw(st.integers(0, layers)), n_group=groups,
               topk_group=draw(st.integers(1, groups)), routed_scaling_factor=draw(st.sampled_from([1.0, 2.5])),
               norm_topk_prob=draw(st.booleans()))
    if model_type == "deepseek_v2":
        moe["topk_method"] = draw(st.sampled_from(["greedy", "group_limited_greedy"]))
    else:
        cfg["rope_interleave"] = draw(st.booleans())
    if draw(st.booleans()):
        cfg.update(moe)
    else:
        cfg.update(first_k_dense_replace=layers)
    return cfg


@st.composite
def edits(draw, model_type: str) -> dict:
    """How a hand-written or older config.json differs from transformers' own: key -> new value, or
    ``...`` to delete the key."""
    optional = ["bos_token_id", "eos_token_id", "torch_dtype", "dtype", "architectures", "transformers_version",
                "use_cache", "pad_token_id"]
    if model_type != "gpt2":
        optional += ["head_dim", "rope_theta", "sliding_window", "rope_scaling", "attention_dropout",
                     "initializer_range", "q_lora_rank"]
    out = {}
    for key in draw(st.lists(st.sampled_from(optional), unique=True, max_size=4)):
        out[key] = draw(st.sampled_from([..., None]))
    if draw(st.booleans()):
        key = draw(st.sampled_from(["torch_dtype", "dtype"]))
        out[key] = draw(st.sampled_from(["float32", "bfloat16", "float16"]))
    if draw(st.booleans()):
        out[draw(st.sampled_from(["my_custom_field", "quantization_note", "_name_or_path"]))] = draw(
            st.sampled_from([1, "x", None, [1, 2], {"a": 1}]))
    return out


@st.composite
def case(draw):
    model_type = draw(st.sampled_from(list(FAMILIES)))
    if model_type == "gpt2":
        cfg = draw(gpt2_config())
    elif model_type.startswith("deepseek"):
        cfg = draw(deepseek_config(model_type))
    else:
        cfg = draw(llama_family_config(model_type))
    return model_type, cfg, draw(edits(model_type)), draw(st.integers(0, 2**16))


def build_folder(folder: Path, model_type: str, cfg: dict, edit: dict, seed: int) -> None:
    config_cls, model_cls = FAMILIES[model_type]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = model_cls(config_cls(**cfg)).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # random init is tiny: widen so logits separate and greedy tokens mean something
        for name, p in hf.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.15)
            elif "norm" in name or name.endswith("ln_f.weight") or ".ln_" in name:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
    hf.save_pretrained(folder)
    path = folder / "config.json"
    data = json.loads(path.read_text())
    for key, value in edit.items():
        if value is ...:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data))
    (folder / "generation_config.json").unlink(missing_ok=True)  # the config under test says the stop tokens


def hf_greedy(hf, ids: list[int], n: int) -> tuple[torch.Tensor, list[int]]:
    seq = list(ids)
    with torch.no_grad():
        first = hf(torch.tensor([seq])).logits[0]
        for _ in range(n):
            seq.append(int(hf(torch.tensor([seq])).logits[0, -1].argmax()))
    return first, seq[len(ids):]


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                                  HealthCheck.data_too_large])
@given(case())
def test_whatever_transformers_loads_kvcache_loads_and_matches(generated):
    model_type, cfg, edit, seed = generated
    CASES["generated"] += 1
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        try:
            build_folder(folder, model_type, cfg, edit, seed)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                hf, info = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                                             output_loading_info=True)
        except Exception:  # noqa: BLE001 - transformers refuses this config: nothing to match
            reject()
        if info["missing_keys"] or info.get("mismatched_keys"):
            reject()  # transformers "loads" it only by initialising weights at random: no reference
        prompt = [i % hf.config.vocab_size for i in PROMPT]
        try:
            reference, tokens = hf_greedy(hf, prompt, NEW_TOKENS)
        except Exception:  # noqa: BLE001 - loads, but transformers cannot run it
            reject()
        CASES["compared"] += 1
        event(f"{model_type}, rope {cfg.get('rope_parameters', {}).get('rope_type', 'learned')}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # out-of-vocabulary special ids warn, as in transformers
            model = load_model(folder)
        with torch.no_grad():
            ours = model(torch.tensor([prompt]))[0]
        scale = reference.abs().max().item()
        assert (ours - reference).abs().max().item() <= 1e-4 * max(1.0, scale), (model_type, cfg, edit)
        assert generate(model, prompt, NEW_TOKENS, stop_token_ids=[]) == tokens, (model_type, cfg, edit)


def test_the_property_test_compared_real_cases():
    """Guards against a strategy transformers always refuses (every case rejected would pass vacuously)."""
    if not CASES["generated"]:
        pytest.skip("run with the property test")
    assert CASES["compared"] >= 0.5 * CASES["generated"], CASES


def test_out_of_vocabulary_special_ids_warn_once_by_name_and_count_as_absent(tmp_path):
    vocab = 50
    build_folder(tmp_path, "gpt2", dict(vocab_size=vocab, n_embd=16, n_head=2, n_layer=1, n_positions=32), {}, 0)
    data = json.loads((tmp_path / "config.json").read_text())
    assert data["bos_token_id"] == data["eos_token_id"] == 50256  # GPT2Config's defaults
    data["eos_token_id"] = [3, 50256]
    (tmp_path / "config.json").write_text(json.dumps(data))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = load_model(tmp_path)
    messages = [str(w.message) for w in caught]
    assert sum("bos_token_id" in m for m in messages) == 1 and sum("eos_token_id" in m for m in messages) == 1
    assert model.config.bos_token_id is None and model.config.eos_token_ids == [3]


@pytest.mark.parametrize("edit, key", [({"hidden_act": "gelu_10"}, "hidden_act"),
                                       ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}},
                                        "rope_parameters.rope_type"),
                                       ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4,
                                                             "factor": 8.0, "low_freq_factor": 4.0,
                                                             "high_freq_factor": 1.0}},
                                        "rope_parameters.high_freq_factor")])
def test_what_cannot_run_is_refused_naming_the_field(tmp_path, edit, key):
    build_folder(tmp_path, "llama", dict(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1), edit, 0)
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        load_model(tmp_path)


@pytest.mark.parametrize("dtype, error, message", [
    ("flaot32", ValueError, "accepted: auto, float32, bfloat16"), (torch.float8_e4m3fn, ValueError, "torch.float32"),
    (torch.int8, ValueError, "not one kvcache computes in"), (32, TypeError, "a torch.dtype or one of the names"),
])
def test_a_bad_dtype_is_named_with_the_accepted_values(gpt2_dir, dtype, error, message):
    with pytest.raises(error, match=message):
        load_model(gpt2_dir, dtype=dtype)


def test_dtype_names_and_aliases(gpt2_dir):
    assert load_model(gpt2_dir, dtype="bf16").dtype == torch.bfloat16
    assert load_model(gpt2_dir, dtype="torch.float16", pack=False).dtype == torch.float16
    with pytest.raises(TypeError, match="pack must be True or False"):
        load_model(gpt2_dir, pack="yes")
    with pytest.raises(TypeError, match="a model path must be a str or a Path"):
        load_model(42)


def test_auto_keeps_the_files_dtype_where_the_cpu_runs_it(tmp_path, monkeypatch, gpt2_dir):
    from kvcache.model import loader

    assert load_model(gpt2_dir, dtype="auto").dtype == torch.float32  # the fixture says float32
    data = json.loads((gpt2_dir / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**data, "torch_dtype": "bfloat16"}))
    for name in ("model.safetensors",):
        (tmp_path / name).symlink_to(gpt2_dir / name)
    for native, want, words in [(True, torch.bfloat16, "native bfloat16"), (False, torch.float32, "no native")]:
        monkeypatch.setattr(loader, "native_bf16", lambda native=native: native)
        model = load_model(tmp_path, dtype="auto")
        assert model.dtype == want and words in model.load_note
    assert loader.auto_dtype("F16")[0] == torch.float32 and "run natively" in loader.auto_dtype("F16")[1]
    assert "kept as F16" in loader.auto_dtype("float16")[1]
    assert "run natively" in loader.auto_dtype("Q8_0")[1]
    assert "Q6_K, dequantized" in loader.auto_dtype("Q6_K")[1]
    assert loader.gguf_format({"a.weight": "Q8_0", "b.weight": "Q8_0", "norm.weight": "F32"}) == "Q8_0"


def test_activations_cover_every_accepted_name():
    from kvcache.model.activations import ACTIVATIONS

    assert set(ACTIVATIONS) == set(ACTIVATION_NAMES)
