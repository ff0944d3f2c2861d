import json

import pytest

from kvcache import memory
from kvcache.memory import (
    ALIASES,
    DTYPE_BYTES,
    PRESETS,
    MemoryReport,
    ModelShape,
    dtype_bytes,
    format_bytes,
    format_report,
    human_bytes,
    kv_cache_bytes,
    kv_cache_elements,
    memory_report,
    shape_from_config,
)

GPT2_CONFIG = {
    "model_type": "gpt2",
    "n_layer": 12,
    "n_head": 12,
    "n_embd": 768,
    "n_positions": 1024,
    "n_ctx": 1024,
    "vocab_size": 50257,
}

LLAMA3_CONFIG = {
    "model_type": "llama",
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "hidden_size": 4096,
    "max_position_embeddings": 8192,
}


def memory_cli(argv):
    """``kvcache memory ARGV`` through the real command line; its exit status."""
    from kvcache.cli import main

    return main(["memory", *argv])


# ----------------------------------------------------------------- presets --


def test_no_torch_needed_at_import():
    # The module must be importable without pulling in torch.
    src = open(memory.__file__, encoding="utf-8").read()
    assert "import torch" not in src


def test_required_presets_present_and_consistent():
    required = {
        "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "gpt3-175b",
        "llama-2-7b", "llama-2-13b", "llama-2-70b", "llama-3-8b", "llama-3-70b",
        "mistral-7b", "qwen2.5-0.5b", "deepseek-v2", "deepseek-v2-lite", "deepseek-v3",
    }
    assert required <= set(PRESETS)
    for name, s in PRESETS.items():
        assert s.name == name
        if s.is_latent:  # MLA heads are not a split of the hidden size; their query/key width is nope + rope
            assert s.head_dim == s.qk_nope_head_dim + s.qk_rope_head_dim, name
        else:
            assert s.num_heads * s.head_dim == s.hidden_size, name
        assert s.num_heads % s.num_kv_heads == 0, name


@pytest.mark.parametrize(
    "name, layers, heads, kv, head_dim, hidden, ctx",
    [
        ("gpt2", 12, 12, 12, 64, 768, 1024),
        ("gpt2-medium", 24, 16, 16, 64, 1024, 1024),
        ("gpt2-large", 36, 20, 20, 64, 1280, 1024),
        ("gpt2-xl", 48, 25, 25, 64, 1600, 1024),
        ("gpt3-175b", 96, 96, 96, 128, 12288, 2048),
        ("llama-2-7b", 32, 32, 32, 128, 4096, 4096),
        ("llama-2-13b", 40, 40, 40, 128, 5120, 4096),
        ("llama-2-70b", 80, 64, 8, 128, 8192, 4096),
        ("llama-3-8b", 32, 32, 8, 128, 4096, 8192),
        ("llama-3-70b", 80, 64, 8, 128, 8192, 8192),
        ("mistral-7b", 32, 32, 8, 128, 4096, 32768),
        ("qwen2.5-0.5b", 24, 14, 2, 64, 896, 32768),
    ],
)
def test_preset_values(name, layers, heads, kv, head_dim, hidden, ctx):
    assert PRESETS[name] == ModelShape(name, layers, heads, kv, head_dim, hidden, ctx)


# ------------------------------------------------------------- arithmetic --


def test_llama2_7b_bytes_per_token():
    assert kv_cache_bytes(PRESETS["llama-2-7b"], tokens=1) == 524_288
    assert memory_report("llama-2-7b", tokens=1).bytes_per_token == 524_288


def test_llama3_8b_gqa_bytes_per_token():
    assert kv_cache_bytes(PRESETS["llama-3-8b"], tokens=1) == 131_072
    assert memory_report("llama-3-8b").bytes_per_token == 131_072


def test_d4096_32_heads_2048_tokens_per_layer():
    shape = ModelShape("d4096", num_layers=32, num_heads=32, num_kv_heads=32,
                       head_dim=4096 // 32, hidden_size=4096, max_positions=None)
    r = memory_report(shape, tokens=2048, dtype="fp16")
    assert r.bytes_per_layer == 33_554_432
    assert r.bytes_per_layer == 2 * 4096 * 2048 * 2
    assert r.bytes_per_sequence == 32 * 33_554_432


def test_gpt3_175b_real_full_width_number():
    r = memory_report("gpt3-175b")  # default tokens = 2048
    assert r.tokens == 2048
    assert r.elements == 2 * 96 * 12288 * 2048 == 4_831_838_208
    assert r.total_bytes == 9_663_676_416  # ~9.66 GB / 9.00 GiB in fp16
    assert r.bytes_per_token == 4_718_592  # 4.5 MiB
    assert format_bytes(r.total_bytes) == "9.66 GB / 9.00 GiB"


def test_gpt3_doc_figure_is_half_the_real_cache():
    # 2*96*96*2048*64 uses head_dim 64 (GPT-3's is 128): it equals one of K/V only.
    doc_elements = 2 * 96 * 96 * 2048 * 64
    assert doc_elements == 2_415_919_104
    assert format_bytes(doc_elements * 2) == "4.83 GB / 4.50 GiB"
    real = memory_report("gpt3-175b", tokens=2048)
    assert real.elements == 2 * doc_elements
    # "4.8 GB" matches the real cache only at 1 byte/element.
    assert memory_report("gpt3-175b", dtype="int8").total_bytes == 2 * doc_elements


def test_report_fields_consistent():
    r = memory_report("LLaMA-2-7B", tokens=4096, batch=8, dtype="bf16")
    assert isinstance(r, MemoryReport)
    assert r.model == "llama-2-7b"
    assert (r.tokens, r.batch, r.dtype) == (4096, 8, "bf16")
    assert r.bytes_per_sequence == r.bytes_per_token * 4096
    assert r.bytes_per_sequence == r.bytes_per_layer * 32
    assert r.total_bytes == r.bytes_per_sequence * 8 == 17_179_869_184
    assert r.elements == r.total_bytes // 2
    assert r.total_bytes == kv_cache_bytes(PRESETS["llama-2-7b"], 4096, 8, "bf16")


def test_tokens_default_to_max_positions():
    assert memory_report("gpt2").tokens == 1024
    assert memory_report("qwen2.5-0.5b").tokens == 32768
    # qwen2.5-0.5b: 2 * 24 * 2 * 64 * 2 bytes = 12,288 B/token
    assert memory_report("qwen2.5-0.5b").bytes_per_token == 12_288


def test_int4_rounds_up_to_whole_bytes():
    tiny = ModelShape("tiny", 1, 1, 1, 1, 1, None)
    # 2 elements per token -> exactly 1 byte per token
    assert kv_cache_bytes(tiny, tokens=1, dtype="int4") == 1
    odd = ModelShape("odd", 1, 3, 3, 1, 3, None)
    # 2*3*1 = 6 elements -> 3 bytes; per-layer of 1 token also integral
    assert kv_cache_bytes(odd, tokens=1, dtype="int4") == 3
    # check rounding directly on an odd element count
    assert memory._bytes_for(7, dtype_bytes("int4")) == 4
    r = memory_report("llama-2-7b", tokens=4096, dtype="int4")
    assert isinstance(r.total_bytes, int)
    assert r.total_bytes == memory_report("llama-2-7b", tokens=4096).total_bytes // 4


def test_kv_cache_bytes_returns_int_for_all_dtypes():
    for dt in DTYPE_BYTES:
        b = kv_cache_bytes(PRESETS["gpt2"], tokens=3, batch=2, dtype=dt)
        assert isinstance(b, int)
        assert b == -(-(2 * 12 * 768 * 3 * 2) * DTYPE_BYTES[dt] // 1)


def test_dtype_bytes_table_and_aliases():
    assert dtype_bytes("fp32") == dtype_bytes("float32") == 4
    assert dtype_bytes("fp16") == dtype_bytes("float16") == 2
    assert dtype_bytes("bf16") == dtype_bytes("BFloat16") == 2
    assert dtype_bytes("fp8") == dtype_bytes("int8") == 1
    assert dtype_bytes("int4") == 0.5
    assert dtype_bytes("torch.float16") == 2


def test_bad_dtype_error_lists_valid_names():
    with pytest.raises(ValueError) as exc:
        dtype_bytes("fp64")
    msg = str(exc.value)
    assert "fp64" in msg and "fp16" in msg and "int4" in msg


def test_unknown_preset_error_lists_presets():
    with pytest.raises(ValueError) as exc:
        memory_report("gpt-5")
    msg = str(exc.value)
    assert "gpt-5" in msg and "llama-2-7b" in msg and "qwen2.5-0.5b" in msg


@pytest.mark.parametrize("kwargs", [{"tokens": 0}, {"tokens": -5}, {"batch": 0}])
def test_non_positive_counts_rejected(kwargs):
    with pytest.raises(ValueError):
        memory_report("gpt2", **kwargs)


# ------------------------------------------- names, paths and dicts accepted --


def test_kv_cache_bytes_takes_a_preset_name_like_memory_report():
    import kvcache

    assert kvcache.kv_cache_bytes("llama-2-7b", tokens=1) == 524_288
    expected = kv_cache_bytes(PRESETS["llama-3-8b"], 4096, 8, "bf16")
    assert kvcache.kv_cache_bytes("LLaMA-3-8B", 4096, 8, "bf16") == expected
    assert kv_cache_bytes("gpt3-175b") == memory_report("gpt3-175b").total_bytes == 9_663_676_416  # tokens: max
    assert kv_cache_elements("gpt3-175b", tokens=2048) == 4_831_838_208
    assert kv_cache_bytes(shape=PRESETS["gpt2"], tokens=2) == kv_cache_bytes("gpt2", 2)  # old keyword still works


def test_kv_cache_bytes_takes_a_config_path_or_dict(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA3_CONFIG))
    expected = kv_cache_bytes(PRESETS["llama-3-8b"], tokens=10)
    assert kv_cache_bytes(tmp_path, tokens=10) == expected
    assert kv_cache_bytes(str(tmp_path / "config.json"), tokens=10) == expected
    assert kv_cache_bytes(LLAMA3_CONFIG, tokens=10) == expected


@pytest.mark.parametrize("model,kwargs,exc,match", [
    ("gpt-5", {"tokens": 1}, ValueError, "gpt-5"),
    (123, {"tokens": 1}, TypeError, "preset name"),
    (None, {"tokens": 1}, TypeError, "preset name"),
    ("gpt2", {"tokens": 0}, ValueError, "tokens"),
    ("gpt2", {"tokens": True}, ValueError, "tokens"),
    ("gpt2", {"tokens": 1, "batch": 0}, ValueError, "batch"),
    (ModelShape("tiny", 1, 1, 1, 1, 1, None), {}, ValueError, "max positions"),
])
def test_kv_cache_bytes_bad_model_or_counts(model, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        kv_cache_bytes(model, **kwargs)


@pytest.mark.parametrize("alias", ["gpt2-small", "GPT2-Small", " gpt2-small "])
def test_gpt2_small_alias(alias):
    assert ALIASES["gpt2-small"] == "gpt2"
    assert memory_report(alias, tokens=7).total_bytes == memory_report("gpt2", tokens=7).total_bytes
    assert kv_cache_bytes(alias, tokens=1) == 2 * 12 * 768 * 2


def test_every_gpt2_shape_the_project_names_is_a_preset_or_alias():
    from kvcache.model.shapes import SHAPES

    for name, cfg in SHAPES.items():
        if not name.startswith("gpt2"):
            continue
        s = memory.resolve_model(name)
        assert (s.num_layers, s.num_kv_heads, s.head_dim, s.max_positions) == (
            cfg["num_layers"], cfg["num_kv_heads"], cfg["head_dim"], cfg["max_positions"]), name
    for size in ("medium", "large", "xl"):
        assert memory.resolve_model(f"gpt2-{size}") is PRESETS[f"gpt2-{size}"]


def test_aliases_point_at_presets_and_do_not_shadow_them():
    for alias, name in ALIASES.items():
        assert name in PRESETS and alias not in PRESETS


# -------------------------------------------------------------- configs --


def test_shape_from_gpt2_config():
    s = shape_from_config(GPT2_CONFIG)
    assert (s.num_layers, s.num_heads, s.num_kv_heads, s.head_dim, s.hidden_size, s.max_positions) == (
        12, 12, 12, 64, 768, 1024)
    assert kv_cache_bytes(s, 1) == kv_cache_bytes(PRESETS["gpt2"], 1)


def test_shape_from_llama_config_gqa_and_defaults():
    s = shape_from_config(LLAMA3_CONFIG)
    assert (s.num_layers, s.num_heads, s.num_kv_heads, s.head_dim, s.max_positions) == (32, 32, 8, 128, 8192)
    assert kv_cache_bytes(s, 1) == 131_072
    # num_key_value_heads defaults to num_attention_heads (Llama-2-7B style)
    cfg = {k: v for k, v in LLAMA3_CONFIG.items() if k != "num_key_value_heads"}
    assert shape_from_config(cfg).num_kv_heads == 32
    # explicit head_dim wins over hidden/heads (and null falls back)
    assert shape_from_config({**LLAMA3_CONFIG, "head_dim": 256}).head_dim == 256
    assert shape_from_config({**LLAMA3_CONFIG, "head_dim": None}).head_dim == 128


def test_shape_from_qwen2_config():
    cfg = {
        "model_type": "qwen2", "num_hidden_layers": 24, "num_attention_heads": 14,
        "num_key_value_heads": 2, "hidden_size": 896, "max_position_embeddings": 32768,
    }
    s = shape_from_config(cfg)
    assert kv_cache_bytes(s, 1) == kv_cache_bytes(PRESETS["qwen2.5-0.5b"], 1)


def test_shape_from_config_missing_key_is_clear():
    cfg = dict(LLAMA3_CONFIG)
    del cfg["num_hidden_layers"]
    with pytest.raises(ValueError) as exc:
        shape_from_config(cfg)
    assert "num_hidden_layers" in str(exc.value)


def test_shape_from_config_file_and_folder(tmp_path):
    folder = tmp_path / "my-llama"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(LLAMA3_CONFIG))
    from_folder = shape_from_config(folder)
    from_file = shape_from_config(folder / "config.json")
    from_str = shape_from_config(str(folder))
    assert from_folder == from_file == from_str
    assert from_folder.name == "my-llama"
    assert memory_report(folder, tokens=1).bytes_per_token == 131_072
    assert memory_report(str(folder / "config.json")).tokens == 8192


def test_shape_from_config_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        shape_from_config(tmp_path / "nope")


# ------------------------------------------------------------- formatting --


def test_human_bytes():
    assert human_bytes(512) == "512 B"
    assert human_bytes(512 * 1024) == "512.0 KiB"
    assert human_bytes(int(4.5 * 1024**3)) == "4.50 GiB"
    assert human_bytes(33_554_432) == "32.0 MiB"
    assert format_bytes(524_288) == "524.3 kB / 512.0 KiB"


def test_format_report_readable():
    text = format_report(memory_report("llama-2-7b", tokens=4096, batch=8))
    assert "llama-2-7b" in text
    assert "524,288" in text
    assert "17,179,869,184" in text
    assert "GiB" in text and "GB" in text
    assert len(text.splitlines()) >= 6


# --------------------------------------------------------------------- CLI --


def test_cli_preset(capsys):
    assert memory_cli(["llama-2-7b", "--tokens", "4096", "--batch", "8", "--dtype", "fp16"]) == 0
    out = capsys.readouterr().out
    assert "llama-2-7b" in out and "17,179,869,184" in out


def test_cli_json_output(capsys):
    assert memory_cli(["--json", "gpt2"]) == 0
    data = json.loads(capsys.readouterr().out)
    for key in ("model", "dtype", "tokens", "batch", "bytes_per_token", "bytes_per_layer",
                "bytes_per_sequence", "total_bytes", "elements"):
        assert key in data
    assert data["model"] == "gpt2"
    assert data["tokens"] == 1024
    assert data["bytes_per_token"] == 2 * 12 * 768 * 2
    assert data["total_bytes"] == data["bytes_per_token"] * 1024


def test_cli_config_path(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(GPT2_CONFIG))
    assert memory_cli([str(tmp_path), "--tokens", "10", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["total_bytes"] == 2 * 12 * 768 * 10 * 2


def test_cli_list(capsys):
    assert memory_cli(["--list"]) == 0
    out = capsys.readouterr().out
    for name in PRESETS:
        assert name in out
    assert "524,288" in out and "131,072" in out


def test_cli_alias(capsys):
    assert memory_cli(["gpt2-small", "--tokens", "1", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["model"] == "gpt2" and data["bytes_per_token"] == 2 * 12 * 768 * 2
    assert memory_cli(["--list"]) == 0
    assert "gpt2-small = gpt2" in capsys.readouterr().out


def test_cli_unknown_preset(capsys):
    assert memory_cli(["no-such-model"]) == 2
    err = capsys.readouterr().err
    assert "no-such-model" in err and "llama-2-7b" in err


def test_cli_bad_dtype(capsys):
    assert memory_cli(["gpt2", "--dtype", "fp64"]) == 2
    err = capsys.readouterr().err
    assert "fp64" in err and "bf16" in err


def test_cli_no_model(capsys):
    assert memory_cli([]) == 2
    assert "preset" in capsys.readouterr().err


def test_cli_bad_tokens(capsys):
    assert memory_cli(["gpt2", "--tokens", "0"]) == 2
    assert "tokens" in capsys.readouterr().err


def test_quantized_sizes_match_the_quantized_cache():
    import torch

    from kvcache.caches.quantized import QuantizedKVCache

    shape = {"num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_size": 256,
             "head_dim": 64, "max_position_embeddings": 4096}
    cache = QuantizedKVCache(2, 2, 64, bits=4, group=32, residual=16, sinks=2, capacity=512)
    k = torch.randn(1, 2, 300, 64)
    for layer in range(2):
        cache.attend(layer, torch.randn(1, 4, 300, 64), k, k)
        cache.attend(layer, torch.randn(1, 4, 1, 64), k[:, :, :1], k[:, :, :1])  # quantizes what 300 tokens leave
    report = memory_report(shape, tokens=300, dtype="int4", group_size=32, residual=16, sinks=2, full_dtype="fp32")
    one_fp_token = 2 * 2 * 2 * 64 * 4
    assert report.total_bytes + one_fp_token == cache.used_bytes
    assert report.bytes_per_element == 0.5 + 4 / 32
    with pytest.raises(ValueError, match="int8/int4"):
        memory_report(shape, tokens=8, dtype="fp16", group_size=32)


def test_memory_cli_quantized(capsys):
    from kvcache.cli import main

    assert main(["memory", "smollm2-135m", "--tokens", "4096", "--dtype", "int8", "--group-size", "32", "--json"]) == 0
    import json

    report = json.loads(capsys.readouterr().out)
    assert report["bytes_per_element"] == 1.125 and report["total_bytes"] == 30 * 2 * 3 * 64 * 4096 * 9 // 8


# ------------------------------------------------------------- multi-head latent attention (DeepSeek)

def test_deepseek_presets_count_the_latent():
    from kvcache.memory import memory_report

    v3 = memory_report("deepseek-v3", tokens=1, dtype="bf16")
    assert v3.bytes_per_token == 61 * (512 + 64) * 2 == 70_272
    assert v3.expanded_bytes_per_token == 61 * 128 * (128 + 64 + 128) * 2 == 4_997_120
    assert memory_report("deepseek-v2-lite", tokens=1, dtype="fp16").bytes_per_token == 27 * 576 * 2
    assert memory_report("deepseek-v2", tokens=1, dtype="fp16").bytes_per_token == 60 * 576 * 2
    assert memory_report("llama-3-8b", tokens=1).bytes_per_token == 131_072  # the GQA comparison


def test_a_deepseek_config_json_is_read_as_latent(tmp_path):
    import json

    from kvcache.memory import format_report, memory_report

    cfg = {"model_type": "deepseek_v3", "num_hidden_layers": 3, "num_attention_heads": 4, "hidden_size": 64,
           "num_key_value_heads": 128, "kv_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 16,
           "v_head_dim": 12, "max_position_embeddings": 256}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    r = memory_report(tmp_path, tokens=100, dtype="fp32")
    assert r.bytes_per_token == 3 * 24 * 4 and r.total_bytes == 100 * 3 * 24 * 4
    assert r.expanded_bytes_per_token == 3 * 4 * (16 + 8 + 12) * 4
    text = format_report(r)
    assert "latent 24 (c_kv 16 + k_pe 8" in text and "6.0x the latent cache" in text
