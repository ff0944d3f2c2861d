"""The server fixture: a live server on loopback (tests/served.py)."""

from __future__ import annotations

import pytest

from kvcache.engine.llm import LLM
from served import Served, chat_model


@pytest.fixture(scope="module")
def served():
    s = Served(LLM(chat_model(), kv_memory="64MiB", max_num_seqs=64))
    yield s
    s.close()
