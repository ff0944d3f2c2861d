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
