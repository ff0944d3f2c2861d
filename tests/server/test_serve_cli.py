"""``kvcache serve`` from the command line: user errors are one line (no traceback), and a real process
answers HTTP, then stops cleanly on Ctrl-C (status 130, like every kvcache command)."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys

import httpx
import pytest

from kvcache.cli import main
from served import check_serve_process


@pytest.mark.parametrize("argv,message", [
    (["--port", "70000"], "--port must be in 0..65535"),
    (["--model", "/no/such/folder"], "cannot load --model /no/such/folder"),
    (["--metrics-prefix", "a-b"], "--metrics-prefix must be"),
    (["--kv-memory", "lots"], "cannot parse a memory size"),
    (["--kv-cache", "int3"], "int3"),
    (["--host", "no.such.host.invalid"], "--host"),
])
def test_user_errors_are_one_line(capsys, argv, message):
    assert main(["serve", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kvcache serve: error: ") and message in err and "Traceback" not in err


def test_a_port_in_use_is_named(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        assert main(["serve", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}" in err and "Traceback" not in err


def test_a_real_server_process():
    proc = subprocess.Popen([sys.executable, "-m", "kvcache.cli", "serve", "--port", "0", "--kv-memory", "16MiB",
                             "--log-level", "warning"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = check_serve_process(proc, "kvcache serve: kvcache-default on http://127.0.0.1:")
        url = line.split(" on ")[1].split(" ")[0]
        assert httpx.get(url + "/health", timeout=30).json() == {"status": "ok"}
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130 and "Traceback" not in err  # stopped by Ctrl-C, as every kvcache command
    assert "kvcache serve: interrupted" in err
