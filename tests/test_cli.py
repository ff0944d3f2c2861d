"""The kvcache command end to end: demo, generate, memory, bench."""

from __future__ import annotations

import json

import pytest

from kvcache.cli import main
from kvcache.model.loader import DEFAULT_MODEL_DIR

shipped = pytest.mark.skipif(not (DEFAULT_MODEL_DIR / "model.safetensors").exists(), reason="no shipped model")


@shipped
def test_demo_reports_identical_outputs_speed_and_memory(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("KVCACHE_HOME", str(tmp_path))  # nothing pulled: the shipped model, and how to get the other
    assert main(["demo", "--max-new-tokens", "16"]) == 0
    out = capsys.readouterr().out
    assert "identical outputs : yes (16/16 tokens agree)" in out
    assert "ms/token" in out and "speedup" in out and "3,072 B per token" in out
    assert "the shipped code model" in out and "kvcache pull smollm2-135m" in out


def test_demo_uses_the_real_model_once_pulled(capsys, real_model_dir):
    assert main(["demo", "--max-new-tokens", "12"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m (real pretrained model, pulled)" in out and "chat template" in out
    assert "identical outputs : yes" in out and "46,080 B per token" in out


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


def test_dtype_auto_says_what_it_computes_in_and_a_bad_dtype_is_one_line(capsys, llama_dir):
    assert main(["generate", "--model", str(llama_dir), "--ids", "1,2,3", "-n", "3", "--dtype", "auto"]) == 0
    assert "computes in float32 (the file's dtype)" in capsys.readouterr().err
    assert main(["generate", "--model", str(llama_dir), "--ids", "1,2,3", "-n", "3", "--dtype", "bf16"]) == 0
    for command in (["generate", "--ids", "1"], ["chat"], ["eval"], ["serve"]):
        assert main([*command, "--dtype", "flaot16"]) == 2
        err = capsys.readouterr().err
        assert "--dtype: dtype 'flaot16' is not one kvcache computes in (accepted: auto, float32" in err
        assert "Traceback" not in err


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
    from kvcache.cli import demo

    with pytest.raises(ValueError, match="max_new_tokens"):
        demo.main(random_shape="gpt2-small", max_new_tokens=0)


def test_memory_accepts_the_gpt2_small_name(capsys):
    assert main(["memory", "gpt2-small", "--tokens", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["bytes_per_token"] == 2 * 12 * 768 * 2


# ------------------------------------------------------------ named models, chat, eval

def test_models_lists_shipped_cached_and_pullable(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("KVCACHE_HOME", str(tmp_path))
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "(shipped)" in out and "pullable" in out and "kvcache pull smollm2-135m" in out
    assert main(["models", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["status"] for r in rows} == {"shipped", "pullable"}


def test_pull_errors_are_one_line(capsys):
    assert main(["pull", "gpt-17"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kvcache pull: error: unknown model name 'gpt-17'") and "Traceback" not in err


def test_pull_when_cached(capsys, real_model_dir):
    assert main(["pull", "smollm2-135m"]) == 0
    assert f"already cached at {real_model_dir}" in capsys.readouterr().out


def test_generate_chat_with_a_model_name(capsys, real_model_dir):
    assert main(["generate", "--chat", "What is the capital of France?", "--model", "smollm2-135m", "-n", "12"]) == 0
    out = capsys.readouterr().out
    assert "Paris" in out and "<|im_end|>" not in out


def test_generate_chat_needs_a_template(capsys):
    assert main(["generate", "--chat", "hi", "-n", "4"]) == 2
    assert "no chat template" in capsys.readouterr().err


def test_chat_session_in_the_terminal(capsys, monkeypatch, real_model_dir):
    lines = iter(["What is the capital of France?", "/reset", "What is the capital of Italy?", "/bogus", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert main(["chat", "--model", "smollm2-135m", "-n", "16"]) == 0
    captured = capsys.readouterr()
    assert "Paris" in captured.out and captured.out.count("assistant> ") == 2
    assert "[conversation reset]" in captured.err and "unknown command '/bogus'" in captured.err
    assert captured.err.count(" 0 from the KV cache") == 2  # the turn after /reset starts from nothing


def test_chat_exits_cleanly_on_eof_and_interrupt(capsys, monkeypatch, real_model_dir):
    for error in (EOFError, KeyboardInterrupt):
        def read(prompt="", error=error):
            raise error
        monkeypatch.setattr("builtins.input", read)
        assert main(["chat", "--model", "smollm2-135m"]) == 0
    assert "Traceback" not in capsys.readouterr().err


def test_chat_bad_options(capsys):
    assert main(["chat", "--temperature", "-1"]) == 2
    assert "temperature must be >= 0" in capsys.readouterr().err


@shipped
def test_eval_json(capsys):
    assert main(["eval", "--corpus", "english", "--context", "64", "--max-tokens", "256", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert {"perplexity", "nll_per_token", "bits_per_byte", "tokens"} <= set(result)
    assert result["tokens"] == 4 * 63 and result["corpus"] == "english"


def test_eval_text_file_and_errors(capsys, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("hello world, " * 200)
    assert main(["eval", "--text", str(text), "--context", "32", "--max-tokens", "64"]) == 0
    assert "perplexity" in capsys.readouterr().out
    assert main(["eval", "--text", str(tmp_path / "missing.txt")]) == 2
    assert "text file not found" in capsys.readouterr().err
    assert main(["eval", "--context", "1"]) == 2
    assert "--context must be >= 2" in capsys.readouterr().err


def test_caches_lists_every_spec(capsys):
    assert main(["caches"]) == 0
    out = capsys.readouterr().out
    for name in ("auto", "fp32", "int8", "int4", "residual=128", "keys=auto (token|channel)"):
        assert name in out


def test_generate_with_a_kv_cache_spec(capsys, llama_dir):
    assert main(["generate", "--model", str(llama_dir), "--ids", "1,2,3", "-n", "6"]) == 0
    exact = capsys.readouterr().out
    assert main(["generate", "--model", str(llama_dir), "--ids", "1,2,3", "-n", "6", "--kv-cache",
                 "int4:residual=100"]) == 0
    captured = capsys.readouterr()
    assert captured.out == exact and "int4:residual=100" in captured.err


@pytest.mark.parametrize("argv", [["generate", "--ids", "1"], ["eval"], ["chat"], ["demo"]])
def test_a_bad_kv_cache_spec_is_one_line(capsys, argv):
    run_error(capsys, argv + ["--kv-cache", "int4:group=x"], argv[0], "--kv-cache: option group='x'")


@shipped
def test_eval_with_a_kv_cache_reports_kl(capsys):
    assert main(["eval", "--corpus", "code", "--context", "64", "--max-tokens", "128", "--kv-cache",
                 "int4:residual=0,group=16", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["cache"] == "int4:residual=0,group=16" and result["kl_vs_exact"] > 0
    assert 0 < result["top1_agreement"] < 1


@shipped
def test_demo_with_a_lossy_cache_says_so(capsys):
    assert main(["demo", "--max-new-tokens", "8", "--kv-cache", "int8:residual=0,group=16"]) == 0
    out = capsys.readouterr().out
    assert "int8:residual=0,group=16" in out and "identical outputs" in out and "stored as" in out


@shipped
def test_eval_compares_several_caches_in_one_run(capsys):
    assert main(["eval", "--context", "64", "--max-tokens", "128", "--kv-cache", "int8:residual=1000",
                 "--kv-cache", "int4:residual=0,group=16", "--json"]) == 0
    lossless, lossy = (json.loads(line) for line in capsys.readouterr().out.splitlines())
    assert lossless["exact_perplexity"] == lossy["exact_perplexity"]
    assert lossless["kl_vs_exact"] < 1e-6 < lossy["kl_vs_exact"]


def test_generate_speculative_prints_the_same_tokens_and_its_stats(capsys, llama_dir):
    base = ["generate", "--model", str(llama_dir), "--ids", "5,6,7,5,6,7,5,6", "-n", "12"]
    assert main(base) == 0
    plain = capsys.readouterr().out
    assert main(base + ["--speculative", "prompt-lookup:min_ngram=1", "--stats"]) == 0
    captured = capsys.readouterr()
    assert captured.out == plain
    assert "[speculative prompt-lookup:min_ngram=1:" in captured.err and "tokens per target pass" in captured.err
    assert main(base + ["--speculative", f"draft:{llama_dir},layers=1,k=2"]) == 0
    assert capsys.readouterr().out == plain


@pytest.mark.parametrize("extra,match", [
    (["--speculative", "lookahead"], "unknown speculative proposer"),
    (["--speculative", "prompt-lookup:k=0"], "k must be >= 1"),
    (["--speculative", "prompt-lookup", "--no-cache"], "cannot run with --no-cache"),
    (["--stats"], "use it with --speculative"),
    (["--speculative", "draft:/no/such/model"], "--speculative"),
])
def test_generate_speculative_user_errors(capsys, llama_dir, extra, match):
    run_error(capsys, ["generate", "--model", str(llama_dir), "--ids", "1,2", "-n", "4", *extra], "generate", match)
