"""``kvcache serve --kv-disk``: a restarted server answers a repeated long prompt from disk (counters in
/metrics), with the same tokens; a bad tier option is a one-line error."""

from __future__ import annotations

import re
import signal
import subprocess
import sys

import httpx
import pytest

from kvcache.cli import main

PROMPT = " ".join(f"line {i}: the quick brown fox jumps over the lazy dog." for i in range(18))


def serve(directory):
    proc = subprocess.Popen([sys.executable, "-m", "kvcache.cli", "serve", "--port", "0", "--kv-memory", "16MiB",
                             "--kv-disk", str(directory), "--kv-chunk", "64", "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert " on http://" in line, line + proc.stderr.read()
    return proc, line.split(" on ")[1].split(" ")[0]


def ask(url) -> tuple[str, int]:
    body = {"prompt": PROMPT, "max_tokens": 12, "temperature": 0}
    r = httpx.post(url + "/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    metrics = httpx.get(url + "/metrics", timeout=30).text
    hit = re.search(r'kvcache:kv_tier_hit_tokens_total\{model_name="[^"]*",tier="disk"\} ([\d.]+)', metrics)
    return r.json()["choices"][0]["text"], int(float(hit.group(1)))


def stop(proc):
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err, err


def test_a_restarted_server_answers_from_disk(tmp_path):
    proc, url = serve(tmp_path)
    try:
        first, hits = ask(url)
        assert hits == 0
    finally:
        stop(proc)
    proc, url = serve(tmp_path)
    try:
        again, hits = ask(url)
    finally:
        stop(proc)
    assert again == first
    assert hits >= 64 * 4  # the prompt's full chunks (~450 tokens) came from disk


@pytest.mark.parametrize("argv, message", [
    (["--kv-disk", "d", "--kv-disk-size", "lots"], "--kv-disk-size: cannot parse"),
    (["--kv-store", "http://x"], "expected redis://"),
    (["--kv-disk", "d", "--kv-chunk", "40"], "not a multiple of the engine's block_size 16"),
])
def test_bad_tier_options_are_one_line(capsys, tmp_path, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    assert main(["serve", "--port", "0", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
