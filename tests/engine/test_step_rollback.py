"""An exception inside ``LLM.step`` (KeyboardInterrupt in the forward pass, an error while
emitting a token) must leave the engine consistent: the step is rolled back, later steps
recompute it, results equal running each request alone and no block leaks or holds KV that
was never written."""

from __future__ import annotations

import random

import pytest

from kvcache.engine.llm import LLM
from kvcache.engine.sequence import SamplingParams, Status
from kvcache.generation.generate import generate
from kvcache.model.loader import load_model

pytestmark = pytest.mark.usefixtures("flush_denormals")

BS = 4
BASE = [random.Random(0).randrange(1, 90) for _ in range(14)]
# 9 and 10 tokens: their prefill fills (and registers) two blocks in the step that may fail
PROMPTS = [BASE[:5], BASE[:9], BASE[:9] + [7]]


@pytest.fixture(scope="module")
def model(model_dir, widen):
    m = load_model(model_dir)
    return widen(m) if m.config.arch == "gpt2" else m  # tiny init weights make GPT-2 blind to its KV


def params():
    return [SamplingParams(max_new_tokens=1, ignore_eos=True),  # finishes in the first step
            SamplingParams(max_new_tokens=8, ignore_eos=True),
            SamplingParams(n=2, temperature=0.8, seed=3, max_new_tokens=8, ignore_eos=True)]


def expected(model):
    ps = params()
    return [[generate(model, p, sp.max_new_tokens, stop_token_ids=[], temperature=sp.temperature,
                      seed=None if sp.seed is None else sp.seed + i) for i in range(sp.n)]
            for p, sp in zip(PROMPTS, ps)]


def new_engine(model):
    llm = LLM(model, num_blocks=64, block_size=BS)
    llm.cache.k.normal_()  # garbage in every slot: reading KV that was never written changes outputs
    llm.cache.v.normal_()
    return llm


def fail_once(monkeypatch, obj, name, at, exc=KeyboardInterrupt):
    """``obj.name`` raises on its ``at``-th call, then behaves again."""
    real, calls = getattr(obj, name), [0]

    def wrapper(*args, **kwargs):
        calls[0] += 1
        if calls[0] == at:
            raise exc("injected")
        return real(*args, **kwargs)

    monkeypatch.setattr(obj, name, wrapper)


def assert_rolled_back(llm):
    """Nothing running or allocated; every unfinished sequence waits with the tokens it has."""
    assert not llm.scheduler.running
    assert llm.block_manager.stats().blocks_in_use == 0
    waiting = {id(s) for s in llm.scheduler.waiting}
    for request in llm.requests.values():
        for seq in request.sequences:
            assert (seq.status is Status.FINISHED) != (id(seq) in waiting)


def run(llm, rids):
    reported = []
    while llm.has_unfinished():
        reported += [r.request_id for r in llm.step()]
    return reported


# forward calls: 1 = the prefill of all three prompts (children forked after it), 2.. = decode steps
@pytest.mark.parametrize("at", [1, 2, 4])
def test_interrupted_forward(model, monkeypatch, at):
    llm = new_engine(model)
    rids = [llm.add_request(p, sp) for p, sp in zip(PROMPTS, params())]
    fail_once(monkeypatch, llm.model, "forward", at)
    reported = []
    with pytest.raises(KeyboardInterrupt):
        for _ in range(at):
            reported += [r.request_id for r in llm.step()]
    assert_rolled_back(llm)
    reported += run(llm, rids)
    assert sorted(reported) == rids  # each finished request reported exactly once
    outs = [llm.output(r) for r in rids]
    assert [[c.token_ids for c in o.outputs] for o in outs] == expected(model)
    # the prompts' blocks were filled in the failed step: a new prompt sharing them is exact
    longer = BASE[:9] + [1, 2, 3]
    (again,) = llm.generate([longer], SamplingParams(max_new_tokens=8, ignore_eos=True))
    assert again.token_ids == generate(model, longer, 8, stop_token_ids=[])
    assert not llm.has_unfinished() and not llm.requests
    assert llm.block_manager.stats().blocks_in_use == 0


# emits in the first step: 1 = request 0 (which finishes), 2 = the n=2 request's child (forked
# before its parent emits), 3 = that parent, 4 = request 1; 5+ = the decode steps
@pytest.mark.parametrize("at", [2, 3, 4, 6])
def test_error_while_emitting(model, monkeypatch, at):
    llm = new_engine(model)
    rids = [llm.add_request(p, sp) for p, sp in zip(PROMPTS, params())]
    fail_once(monkeypatch, llm.stop_rules, "emit", at, RuntimeError)
    reported = []
    with pytest.raises(RuntimeError, match="injected"):
        while True:
            reported += [r.request_id for r in llm.step()]
    assert_rolled_back(llm)
    reported += run(llm, rids)
    assert sorted(reported) == rids
    outs = [llm.output(r) for r in rids]
    assert [[c.token_ids for c in o.outputs] for o in outs] == expected(model)
    assert llm.block_manager.stats().blocks_in_use == 0


def test_interrupted_generate_leaves_nothing_behind(model, monkeypatch):
    llm = new_engine(model)
    fail_once(monkeypatch, llm.model, "forward", 1)
    with pytest.raises(KeyboardInterrupt):
        llm.generate(PROMPTS, params())
    assert not llm.requests and not llm.has_unfinished()
    assert llm.block_manager.stats().blocks_in_use == 0
    # the blocks reserved in the failed step are not in the prefix cache: a rerun is exact
    outs = llm.generate(PROMPTS, params())
    assert [[c.token_ids for c in o.outputs] for o in outs] == expected(model)
    fresh = new_engine(model).generate(PROMPTS, params())
    assert [o.outputs for o in outs] == [o.outputs for o in fresh]
    assert not llm.requests and llm.block_manager.stats().blocks_in_use == 0
