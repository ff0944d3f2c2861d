"""``LLM.step_deltas``: what streaming clients see.  The deltas of every completion concatenate to its
final output (token ids and text), the finish reason comes once with the last delta, and nothing a stop
string cuts is ever sent."""

from __future__ import annotations

import pytest

from kvcache.engine.llm import LLM
from kvcache.engine.sequence import SamplingParams
from kvcache.model.loader import load_model


@pytest.fixture(scope="module")
def model():
    return load_model()  # the shipped code model: a real BPE tokenizer


def run_streaming(llm, prompts, params):
    ids = [llm.add_request(p, sp) for p, sp in zip(prompts, params)]
    got = {i: {} for i in ids}
    finished = []
    while llm.has_unfinished():
        for delta in llm.step_deltas():
            assert not delta.error
            for c in delta.outputs:
                tokens, text, reasons = got[delta.request_id].setdefault(c.index, ([], [], []))
                tokens += c.token_ids
                text.append(c.text)
                if c.finish_reason:
                    reasons.append(c.finish_reason)
            if delta.finished:
                finished.append(delta.request_id)
    assert sorted(finished) == sorted(ids)  # each request's final delta exactly once
    return ids, got


def test_deltas_concatenate_to_the_output(model):
    llm = LLM(model, kv_memory="32MiB")
    prompts = ["def fibonacci(n):", "import os\n", "class Stack:\n    def push(self, x):"]
    params = [SamplingParams(max_new_tokens=40, stop=["\n\n", "return"]),
              SamplingParams(max_new_tokens=24, temperature=0.8, seed=3, n=3),
              SamplingParams(max_new_tokens=30, ignore_eos=True)]
    ids, got = run_streaming(llm, prompts, params)
    offline = LLM(model, kv_memory="32MiB").generate(prompts, params)
    for rid, want in zip(ids, offline):
        assert sorted(got[rid]) == list(range(len(want.outputs)))
        for c in want.outputs:
            tokens, texts, reasons = got[rid][c.index]
            assert tokens == c.token_ids and "".join(texts) == c.text
            assert reasons == [c.finish_reason]
        assert llm.output(rid).outputs == want.outputs
    assert llm.block_manager.stats().blocks_in_use == 0


def test_a_stop_string_is_never_streamed(model):
    llm = LLM(model, kv_memory="32MiB")
    text = LLM(model, kv_memory="32MiB").generate("def f(x):", SamplingParams(max_new_tokens=30, ignore_eos=True))
    stop = text[0].text[10:16]  # a string the output is known to contain, across tokens
    ids, got = run_streaming(llm, ["def f(x):"], [SamplingParams(max_new_tokens=30, stop=[stop], ignore_eos=True)])
    tokens, texts, reasons = got[ids[0]][0]
    full = text[0].text
    assert "".join(texts) == full[:full.find(stop)] and reasons == ["stop"]
    assert stop not in "".join(texts)


def test_a_request_rejected_at_add_reports_one_final_delta(model):
    llm = LLM(model, num_blocks=4, block_size=16)
    rid = llm.add_request("x = 1", SamplingParams(max_new_tokens=200))
    deltas = llm.step_deltas()
    assert [(d.request_id, d.finished, d.outputs) for d in deltas] == [(rid, True, [])]
    assert "KV" in deltas[0].error
    assert llm.step_deltas() == []  # reported once
