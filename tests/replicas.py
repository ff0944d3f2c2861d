"""Engine replicas on a local Ray cluster for the tests: the shipped code model with a chat template, deployed
through ``kvcache.distributed.deploy`` (the public entry point), and helpers to read the merged /metrics."""

from __future__ import annotations

import os
import time
from pathlib import Path

import httpx
import pytest

NAME = "code-model"


def require_ray() -> None:
    try:
        import ray.serve  # noqa: F401
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail('CI must install the distributed extra (pip install -e ".[distributed]")', pytrace=False)
        pytest.skip("needs Ray Serve (the distributed extra)", allow_module_level=True)


def chat_model_dir(directory: Path) -> Path:
    """A copy of the shipped model folder whose tokenizer config carries a chat template."""
    from kvcache.bench.replicas import shipped_model_with_chat_template

    return shipped_model_with_chat_template(directory)


def deploy(model_dir: Path, **options) -> str:
    from kvcache.distributed import deploy as deploy_replicas

    options = {"replicas": 2, "port": 0, "kv_memory": "16MiB", "log_level": "warning", "served_model_name": NAME,
               **options}
    return deploy_replicas(str(model_dir), **options)


def client(url: str):
    from openai import OpenAI

    return OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)


def metric(url: str, name: str, **labels) -> dict[str, float]:
    """``name``'s value per replica, from the ingress's /metrics (series matching ``labels``)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics", timeout=30).text
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                replica = s.labels.get("replica", "")
                found[replica] = found.get(replica, 0.0) + s.value
    return found


def replicas(url: str) -> list[dict]:
    return httpx.get(url + "/engine/state", timeout=30).json()["replicas"]


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.2)
