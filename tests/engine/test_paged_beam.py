"""Paged beam search (forks + copy-on-write in the engine's pool) == the contiguous reference."""

from __future__ import annotations

import pytest
import torch

from kvcache.engine import paged_beam as beam_mod
from kvcache.engine.block_manager import OutOfBlocks
from kvcache.engine.llm import LLM
from kvcache.engine.paged_beam import paged_beam_search
from kvcache.engine.sequence import SamplingParams
from kvcache.generation.beam import beam_search
from kvcache.generation.generate import generate
from kvcache.model.loader import load_model

PROMPT = [3, 17, 42, 8, 29, 11, 5]


@pytest.fixture(scope="module")
def model(model_dir):
    return load_model(model_dir)


def assert_same(paged, ref):
    assert [h.token_ids for h in paged] == [h.token_ids for h in ref]
    torch.testing.assert_close([h.score for h in paged], [h.score for h in ref], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close([h.logprob for h in paged], [h.logprob for h in ref], rtol=1e-4, atol=1e-4)


def in_use(llm):
    return llm.block_manager.stats().blocks_in_use


def held_by_engine(llm):
    """Blocks in the tables of the engine's running sequences."""
    bm = llm.block_manager
    return len(set().union(*(bm.block_table(s.seq_id) for s in llm.scheduler.running)))


@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("width", [2, 4])
def test_paged_equals_reference(model, block_size, width):
    llm = LLM(model, num_blocks=64, block_size=block_size)
    ref = beam_search(model, PROMPT, width, 24, stop_token_ids=[])
    paged = paged_beam_search(llm, PROMPT, width, 24, stop_token_ids=[])
    assert len(paged) == width
    assert_same(paged, ref)
    stats = llm.block_manager.stats()
    assert stats.blocks_in_use == 0
    assert stats.cow_copies > 0  # beams forked off shared partial blocks
    # the prompt's full blocks went to the prefix cache: a second run reuses them and agrees
    again = paged_beam_search(llm, PROMPT, width, 24, stop_token_ids=[])
    assert_same(again, ref)
    assert llm.block_manager.stats().prefix_hit_tokens == (len(PROMPT) - 1) // block_size * block_size
    assert in_use(llm) == 0


@pytest.mark.parametrize("length_penalty", [1.0, 0.0])
def test_paged_equals_reference_with_stop_tokens(model, length_penalty):
    best = beam_search(model, PROMPT, 4, 16, stop_token_ids=[])[0].token_ids
    stops = list(dict.fromkeys([best[3], best[5]]))
    llm = LLM(model, num_blocks=64, block_size=4)
    ref = beam_search(model, PROMPT, 4, 16, length_penalty, stop_token_ids=stops)
    paged = paged_beam_search(llm, PROMPT, 4, 16, length_penalty, stop_token_ids=stops)
    assert_same(paged, ref)
    assert in_use(llm) == 0


def test_width_one_and_zero_tokens(model):
    llm = LLM(model, num_blocks=32, block_size=4)
    assert paged_beam_search(llm, PROMPT, 1, 20, stop_token_ids=[])[0].token_ids == \
        generate(model, PROMPT, 20, stop_token_ids=[])
    assert paged_beam_search(llm, PROMPT, 3, 0) == []
    assert in_use(llm) == 0


def test_out_of_blocks_preempts_the_group_and_leaks_nothing(model):
    llm = LLM(model, num_blocks=6, block_size=4)  # 24 token slots; 4 beams of 7 + 24 tokens cannot fit
    with pytest.raises(OutOfBlocks, match=r"needed \d+ blocks .* pool has 6 blocks") as info:
        paged_beam_search(llm, PROMPT, 4, 24, stop_token_ids=[])
    assert "preempted" in str(info.value)
    assert in_use(llm) == 0
    # the pool is intact and its prefix cache holds only valid KV: later work is exact
    assert paged_beam_search(llm, PROMPT, 1, 10, stop_token_ids=[])[0].token_ids == \
        generate(model, PROMPT, 10, stop_token_ids=[])
    out = llm.generate([PROMPT], SamplingParams(max_new_tokens=16))[0]
    assert out.outputs[0].token_ids == generate(model, PROMPT, 16)
    assert in_use(llm) == 0


OTHERS = [[5, 6, 7, 8, 9, 10, 11, 12], [20, 21, 22, 23, 24, 25, 26, 27, 28]]


def start_others(llm, new_tokens=12):
    """Two engine requests in flight (prefilled and decoding) holding blocks of the pool."""
    rids = [llm.add_request(p, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)) for p in OTHERS]
    llm.step()
    llm.step()
    assert in_use(llm) > 0
    return rids


def finish_others(llm, model, rids, new_tokens=12):
    """Step to the end; each other request is reported exactly once and equals running alone."""
    reported = []
    while llm.has_unfinished():
        reported += [r.request_id for r in llm.step()]
    assert sorted(reported) == sorted(rids)
    for rid, prompt in zip(rids, OTHERS):
        assert llm.output(rid).token_ids == generate(model, prompt, new_tokens, stop_token_ids=[])
    assert in_use(llm) == 0 and not llm.requests


def count_admissions(monkeypatch):
    calls = []
    real = beam_mod._BeamGroup.admit

    def spy(self, seqs, when):
        calls.append(when)
        return real(self, seqs, when)

    monkeypatch.setattr(beam_mod._BeamGroup, "admit", spy)
    return calls


def test_short_of_memory_the_group_waits_for_other_requests_and_resumes(model, monkeypatch):
    """10 blocks: the other requests hold some, the 3 beams outgrow the rest mid-search. The group
    is preempted, the others are stepped until it fits, the beams are recomputed: same result."""
    ref = beam_search(model, PROMPT, 3, 12, stop_token_ids=[])
    llm = LLM(model, num_blocks=10, block_size=4)
    rids = start_others(llm)
    admissions = count_admissions(monkeypatch)
    paged = paged_beam_search(llm, PROMPT, 3, 12, stop_token_ids=[])
    assert_same(paged, ref)
    assert admissions[0] == "prefilling the prompt" and len(admissions) > 1  # resumed by recompute
    assert all(w.startswith("at new token") for w in admissions[1:])
    assert in_use(llm) == held_by_engine(llm)  # the group freed everything it held
    finish_others(llm, model, rids)
    # and the same search with the pool to itself agrees too
    assert_same(paged_beam_search(llm, PROMPT, 3, 12, stop_token_ids=[]), ref)
    assert in_use(llm) == 0


def test_group_that_can_never_fit_raises_even_with_others_running(model):
    llm = LLM(model, num_blocks=10, block_size=4)  # 4 beams of 7 + 24 tokens need more than 10 blocks
    rids = start_others(llm)
    with pytest.raises(OutOfBlocks, match="pool has 10 blocks"):
        paged_beam_search(llm, PROMPT, 4, 24, stop_token_ids=[])
    assert in_use(llm) == held_by_engine(llm)
    finish_others(llm, model, rids)
    out = llm.generate([PROMPT], SamplingParams(max_new_tokens=16, ignore_eos=True))[0]
    assert out.token_ids == generate(model, PROMPT, 16, stop_token_ids=[])
    assert in_use(llm) == 0


def test_prompt_larger_than_pool(model):
    llm = LLM(model, num_blocks=2, block_size=4)
    with pytest.raises(OutOfBlocks, match="prefilling the prompt.*needed 3 blocks"):
        paged_beam_search(llm, PROMPT + [1, 2], 2, 4)
    assert in_use(llm) == 0


class _FailingModel:
    """Wraps the model; the n-th forward raises (an interrupted step)."""

    def __init__(self, model, fail_at):
        self.model, self.fail_at, self.calls = model, fail_at, 0
        self.config = model.config

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.fail_at:
            raise KeyboardInterrupt
        return self.model(*args, **kwargs)


def test_error_mid_search_frees_everything(model):
    llm = LLM(model, num_blocks=64, block_size=4)
    real = llm.model
    # call 1 prefills 7 tokens; call 2 would write new token 1 at position 7, filling
    # block 1 of every beam (so the block manager has already registered it as cached)
    llm.model = _FailingModel(real, fail_at=2)
    try:
        with pytest.raises(KeyboardInterrupt):
            paged_beam_search(llm, PROMPT, 4, 12, stop_token_ids=[])
    finally:
        llm.model = real
    assert in_use(llm) == 0
    ref = beam_search(model, PROMPT, 4, 12, stop_token_ids=[])
    # a prompt extending a beam's filled block must not hit the never-written KV
    longer = PROMPT + ref[0].token_ids[:2]
    out = llm.generate([longer], SamplingParams(max_new_tokens=16))[0]
    assert out.outputs[0].token_ids == generate(model, longer, 16)
    assert_same(paged_beam_search(llm, PROMPT, 4, 12, stop_token_ids=[]), ref)
    assert in_use(llm) == 0


def test_validation_allocates_nothing(model):
    llm = LLM(model, num_blocks=16, block_size=4)
    for bad in (0, 2.0, False):
        with pytest.raises(ValueError, match="beam_width"):
            paged_beam_search(llm, PROMPT, bad, 4)
    with pytest.raises(ValueError, match="vocabulary"):
        paged_beam_search(llm, [model.config.vocab_size + 5], 2, 4)
    stats = llm.block_manager.stats()
    assert stats.blocks_in_use == 0 and stats.prefix_query_tokens == 0
