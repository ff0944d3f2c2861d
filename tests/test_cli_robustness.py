"""The CLI never shows a traceback for a user error: broken model folders (fuzzed), prompts that are not
UTF-8, a closed pipe and Ctrl-C all end with one line and the conventional exit status."""

from __future__ import annotations

import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvcache import cli
from kvcache.cli import generate, main
from kvcache.model.loader import DEFAULT_MODEL_DIR

FILES = ["config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json", "model.safetensors"]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    for f in DEFAULT_MODEL_DIR.iterdir():
        if f.is_file():
            shutil.copy(f, folder / f.name)
    return folder


def one_line_error(capsys, argv, status=2):
    assert main(argv) == status
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and len(captured.err.strip().splitlines()) == 1, captured.err
    return captured.err


@settings(max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(FILES), content=st.one_of(
    st.binary(max_size=64), st.sampled_from([b"", b"[]", b"{}", b"null", b'{"model_type": "llama"}',
                                             b'{"vocab_size": "x"}', b"\xff\xfe\x00"])))
def test_a_broken_file_in_the_model_folder_is_one_line(capsys, tmp_path_factory, pristine, name, content):
    folder = tmp_path_factory.mktemp("broken")
    for f in pristine.iterdir():
        shutil.copy(f, folder / f.name)
    (folder / name).write_bytes(content)
    status = main(["generate", "--model", str(folder), "--ids", "1,2,3", "-n", "2"])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    if status != 0:  # a harmless mutation (e.g. an empty generation_config) may still load
        assert status == 2 and captured.err.startswith("kvcache generate: error: "), captured.err


def test_a_prompt_that_is_not_utf8(capsys):
    err = one_line_error(capsys, ["generate", "\udcff\udcfe", "-n", "2"])
    assert "not valid UTF-8" in err


def test_ctrl_c_is_exit_130(capsys, monkeypatch):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(generate, "run", interrupted)
    err = one_line_error(capsys, ["generate", "x"], status=130)
    assert "interrupted" in err


def test_a_closed_pipe_is_quiet(capsys, monkeypatch):
    def closed(args):
        raise BrokenPipeError

    monkeypatch.setattr(generate, "run", closed)
    monkeypatch.setattr(cli, "_silence_stdout", lambda: None)  # pytest owns stdout here
    assert main(["generate", "x"]) == 141
    assert capsys.readouterr().err == ""


WEIRD = st.sampled_from(["0", "-1", "1e9", "nan", "inf", "abc", "", " ", "1,2", "\udcff", "999999999999999999999",
                         "int4:group=0", "int8", "-0.0", "0.5", "100000"])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(command=st.sampled_from([
    ["memory", "smollm2-135m", "--tokens"], ["memory", "llama-2-7b", "--batch"], ["memory", "gpt2", "--dtype"],
    ["memory", "gpt2", "--group-size"], ["generate", "--ids", "1,2", "-n", "2", "--temperature"],
    ["generate", "--ids", "1,2", "-n", "2", "--top-p"], ["generate", "--ids", "1,2", "-n"],
    ["generate", "--ids", "1,2", "-n", "2", "--kv-cache"], ["generate", "--ids"], ["eval", "--context"],
    ["eval", "--max-tokens", "64", "--context", "32", "--kv-cache"], ["demo", "--max-new-tokens"]]),
    value=WEIRD)
def test_weird_argument_values_never_show_a_traceback(capsys, command, value):
    try:
        status = main(command + [value])
    except SystemExit as exit:  # argparse's own usage errors
        status = exit.code
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    assert status in (0, 1, 2), (status, captured.err)
