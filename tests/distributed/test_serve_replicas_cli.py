"""``kvcache serve --replicas 2`` from the command line: bad options are one line before any Ray process starts,
and a real process starts a local Ray cluster, answers on its port, and stops cleanly on Ctrl-C."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from kvcache.cli import main
from replicas import require_ray
from served import check_serve_process

require_ray()
pytestmark = pytest.mark.timeout(300)


@pytest.mark.parametrize("argv,message", [
    (["--replicas", "0"], "--replicas must be at least 1"),
    (["--replicas", "2", "--replica-cpus", "0"], "--replica-cpus must be positive"),
    (["--replicas", "2", "--router-match", "2"], "match_threshold must be in 0..1"),
    (["--replicas", "2", "--router-balance-rel", "0.5"], "balance_rel"),
    (["--replicas", "2", "--max-waiting", "0"], "--max-waiting must be at least 1"),
])
def test_bad_replica_options_are_one_line(capsys, argv, message):
    import ray

    assert main(["serve", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kvcache serve: error: ") and message in err and "Traceback" not in err
    assert not ray.is_initialized()  # refused before any Ray process started


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
def test_a_replicated_server_process(stop):
    """Ctrl-C, or a service manager's SIGTERM, deletes the application and stops the cluster it started."""
    proc = subprocess.Popen([sys.executable, "-m", "kvcache.cli", "serve", "--replicas", "2", "--port", "0",
                             "--kv-memory", "16MiB", "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = check_serve_process(proc, "kvcache serve: kvcache-default on http://127.0.0.1:")
        assert "2 replicas on Ray Serve" in line
    finally:
        proc.send_signal(stop)
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert err.rstrip().endswith("kvcache serve: interrupted"), err[-2000:]
