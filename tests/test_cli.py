"""The kvcache command end to end: demo, generate, memory, bench."""

from __future__ import annotations

import json

import pytest

from kvcache.cli import main
from kvcache.model.loader import DEFAULT_MODEL_DIR

shipped = pytest.mark.skipif(not (DEFAULT_MODEL_DIR / "model.safetensors").exists(), reason="no shipped model")


@shipped
def test_demo_reports_identical_outputs_speed_and_memory(capsys):
    assert main(["demo", "--max-new-tokens", "16"]) == 0
    out = capsys.readouterr().out
    assert "identical outputs : yes (16/16 tokens agree)" in out
    assert "ms/token" in out and "speedup" in out and "3,072 B per token" in out


def test_demo_on_a_local_checkpoint(capsys, gpt2_dir):
    assert main(["demo", "--model", str(gpt2_dir), "--max-new-tokens", "8", "--prompt", "!#"]) == 0
    out = capsys.readouterr().out
    assert "identical outputs : yes (8/8 tokens agree)" in out and str(gpt2_dir) in out


def test_demo_with_random_weights_says_so(capsys):
    assert main(["demo", "--random", "gpt2-small", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "RANDOM WEIGHTS" in out and "identical outputs : yes" in out


@shipped
def test_generate_streams_text_and_reports_speed(capsys):
    assert main(["generate", "def f(", "-n", "8"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("def f(") and len(captured.out) > len("def f(")
    assert "8 tokens" in captured.err or "tokens in" in captured.err


def test_generate_ids_cached_equals_uncached(capsys, llama_dir):
    assert main(["generate", "--model", str(llama_dir), "--ids", "1,2,3", "-n", "6"]) == 0
    cached = capsys.readouterr().out
    assert main(["generate", "--model", str(llama_dir), "--ids", "1 2 3", "-n", "6", "--no-cache"]) == 0
    assert capsys.readouterr().out == cached and len(cached.split()) <= 6


def test_generate_error_exits_2_without_output(capsys, llama_dir):
    assert main(["generate", "--model", str(llama_dir), "--ids", "1", "-n", "100000"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "exceeds" in captured.err


def test_memory_json(capsys):
    assert main(["memory", "llama-2-7b", "--tokens", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["bytes_per_token"] == 524_288


def test_bench_quick_scenario(capsys):
    assert main(["bench", "memory", "--quick"]) == 0
    out = capsys.readouterr().out
    assert "paged (block size 16)" in out and "reserve max length" in out


# ------------------------------------------------------------- user errors

def run_error(capsys, argv, command, match):
    """A user error: exit status 2, nothing on stdout, one 'kvcache <command>: error:' line naming it."""
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"kvcache {command}: error: "), captured.err
    assert "Traceback" not in captured.err and match in lines[0], lines[0]
    return lines[0]


def _unsupported_folder(tmp_path, src):
    import shutil

    folder = tmp_path / "bert"
    folder.mkdir()
    shutil.copy(src / "model.safetensors", folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertForMaskedLM"]}))
    return folder


def _fewer_layers_folder(tmp_path, src):
    import shutil

    folder = tmp_path / "one-layer"
    shutil.copytree(src, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["n_layer"] = 1  # the checkpoint has 2
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


@pytest.mark.parametrize("command", ["generate", "demo"])
def test_missing_model_folder(capsys, tmp_path, command):
    line = run_error(capsys, [command, "--model", str(tmp_path / "nope")], command, "not found")
    assert str(tmp_path / "nope") in line


@pytest.mark.parametrize("command", ["generate", "demo"])
def test_unsupported_or_mismatched_model_folder(capsys, tmp_path, gpt2_dir, command):
    run_error(capsys, [command, "--model", str(_unsupported_folder(tmp_path, gpt2_dir))], command, "bert")
    run_error(capsys, [command, "--model", str(_fewer_layers_folder(tmp_path, gpt2_dir))], command, "num_layers=1")
    run_error(capsys, [command, "--model", str(tmp_path)], command, "config.json")  # a folder, but no model


@pytest.mark.parametrize("ids,match", [("1,a", "--ids"), ("1.5", "--ids"), ("", "empty prompt"),
                                       ("1,,-3", "vocabulary"), ("1,500", "vocabulary")])
def test_generate_bad_ids(capsys, gpt2_dir, ids, match):
    run_error(capsys, ["generate", "--model", str(gpt2_dir), "--ids", ids, "-n", "2"], "generate", match)


@pytest.mark.parametrize("option,match", [(["-n", "-1"], "max_new_tokens"), (["--top-k", "0"], "top_k"),
                                          (["-t", "-1"], "temperature"), (["--top-p", "2"], "top_p"),
                                          (["--seed", str(2**70)], "seed")])
def test_generate_bad_sampling_options(capsys, gpt2_dir, option, match):
    run_error(capsys, ["generate", "--model", str(gpt2_dir), "--ids", "1,2", *option], "generate", match)


@pytest.mark.parametrize("n", ["0", "-3"])
def test_demo_needs_at_least_one_new_token(capsys, gpt2_dir, n):
    run_error(capsys, ["demo", "--model", str(gpt2_dir), "--max-new-tokens", n], "demo", "--max-new-tokens")


def test_demo_prompt_longer_than_the_model(capsys, gpt2_dir):
    # byte-level tokenizer: 300 characters are 300 tokens, the checkpoint has 256 positions
    run_error(capsys, ["demo", "--model", str(gpt2_dir), "--prompt", "!" * 300], "demo", "no room")


def test_demo_python_api_rejects_zero_tokens():
    from kvcache import demo

    with pytest.raises(ValueError, match="max_new_tokens"):
        demo.main(random_shape="gpt2-small", max_new_tokens=0)


def test_memory_accepts_the_gpt2_small_name(capsys):
    assert main(["memory", "gpt2-small", "--tokens", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["bytes_per_token"] == 2 * 12 * 768 * 2
