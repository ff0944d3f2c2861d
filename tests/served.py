"""A server on 127.0.0.1 with an ephemeral port, serving the shipped code model (given a chat template, so
the chat endpoint has something to render), and the official ``openai`` client pointed at it."""

from __future__ import annotations

import os
import shutil
import time

import httpx
import pytest

from kvcache.bench.replicas import CHATML
from kvcache.engine.llm import LLM
from kvcache.model.loader import load_model
from kvcache.server.app import build_app
from kvcache.server.serve import start_in_thread

NAME = "code-model"


class Served:
    def __init__(self, llm: LLM, name: str = NAME, **app_options):
        self.llm = llm
        self.app = build_app(llm, name, **app_options)
        self.server, self.thread, self.url = start_in_thread(self.app)
        self.http = httpx.Client(base_url=self.url, timeout=60)

    def client(self, **kw):
        from openai import OpenAI

        return OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, **kw)

    def state(self) -> dict:
        return self.http.get("/engine/state").json()

    def wait_idle(self, timeout: float = 30.0) -> dict:
        """The engine's state once it holds no request (every client's requests finished or were aborted)."""
        deadline = time.monotonic() + timeout
        while True:
            state = self.state()
            if state["requests_held"] == 0 or time.monotonic() > deadline:
                return state
            time.sleep(0.05)

    def close(self) -> None:
        self.http.close()
        self.server.should_exit = True
        self.thread.join(timeout=30)


def chat_model():
    model = load_model()
    model.tokenizer.chat_template = CHATML
    return model




@pytest.fixture(scope="module")
def served():
    """A live server on loopback for a test module (import this fixture into the module)."""
    s = Served(LLM(chat_model(), kv_memory="64MiB", max_num_seqs=64))
    yield s
    s.close()


def check_serve_process(proc, first_line: str) -> str:
    """A ``kvcache serve`` process: its first line starts with ``first_line`` and names its address, where it
    answers a completion and serves the page.  The line."""
    line = proc.stdout.readline()
    assert line.startswith(first_line), line + proc.stderr.read()
    url = line.split(" on ")[1].split(" ")[0]
    r = httpx.post(url + "/v1/completions", json={"prompt": "def f():", "max_tokens": 4}, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 4
    assert "<title>kvcache</title>" in httpx.get(url + "/", timeout=30).text
    return line


def require_browser() -> None:
    """Skip the module without Debian's chromium and chromium-driver (under CI, fail: .ci/run installs them)."""
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        if os.environ.get("CI"):
            pytest.fail("CI must install Debian's chromium and chromium-driver (.ci/run does)", pytrace=False)
        pytest.skip("needs Debian's chromium and chromium-driver", allow_module_level=True)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Headless Chromium driven by Selenium; a test using it skips (fails under CI) without Chromium."""
    require_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1280,800",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    yield driver
    driver.quit()
