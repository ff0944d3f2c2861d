"""The page in a real browser: headless Chromium (Debian's chromium + chromium-driver, driven by Selenium)
loads it, sends a message, watches the answer stream in token by token and the block grid change.  The
screenshot is kept in test-artifacts/server-page.png."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from kvcache.engine.llm import LLM
from kvcache.engine.sequence import SamplingParams
from served import NAME, Served, chat_model, require_browser

ARTIFACTS = Path(os.environ.get("KVCACHE_ARTIFACTS", Path(__file__).resolve().parents[2] / "test-artifacts"))
require_browser()

MESSAGE = "def add(a, b):"


@pytest.fixture(scope="module")
def slow_served():
    """A server whose steps take a few ms more, so a person (and the test) can watch the stream."""
    llm = LLM(chat_model(), kv_memory="8MiB")
    step = llm.step

    def step_slowly():
        time.sleep(0.004)
        return step()

    llm.step = step_slowly
    s = Served(llm)
    yield s
    s.close()


def test_the_page_streams_an_answer_and_shows_the_blocks(slow_served, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    want = LLM(chat_model(), kv_memory="8MiB").chat([{"role": "user", "content": MESSAGE}],
                                                     SamplingParams(max_new_tokens=64))[0].outputs[0].text
    browser.get(slow_served.url + "/?temperature=0&max_tokens=64")
    wait = WebDriverWait(browser, 30, poll_frequency=0.02)
    wait.until(lambda d: d.find_element(By.ID, "model").text == NAME)
    grid = browser.find_element(By.ID, "blocks")
    cached_before = int(grid.get_attribute("data-cached"))
    assert int(grid.get_attribute("data-free")) == slow_served.llm.num_blocks  # an idle pool: all free

    browser.find_element(By.ID, "input").send_keys(MESSAGE, Keys.ENTER)
    answer = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, ".msg.assistant"))
    lengths, in_use = set(), 0
    while answer.get_attribute("data-state") == "streaming":
        lengths.add(len(answer.text))
        in_use = max(in_use, int(grid.get_attribute("data-in-use")))
        time.sleep(0.02)
    assert answer.get_attribute("data-state") == "done", answer.text
    assert answer.text == want.strip() or answer.text == want  # the browser trims a bubble's edges
    assert len(lengths - {0}) >= 3  # seen growing, token by token, not all at once
    assert in_use > 0  # the grid showed blocks in use while the answer streamed
    wait.until(lambda d: int(grid.get_attribute("data-cached")) > cached_before)  # then kept for reuse
    assert browser.find_element(By.CSS_SELECTOR, ".msg.user").text == MESSAGE
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(ARTIFACTS / "server-page.png"))
