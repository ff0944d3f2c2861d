"""The LLM engine end to end on tiny random-weight models: every result must equal
running the request alone with ``generate`` (greedy or seeded sampling)."""

from __future__ import annotations

import random
import weakref

import pytest
import torch

from kvcache.caches.paged import PagedKVCache
from kvcache.engine.llm import LLM, parse_bytes
from kvcache.engine.sequence import SamplingParams
from kvcache.generation.generate import generate
from kvcache.model.loader import load_model

pytestmark = pytest.mark.usefixtures("flush_denormals")

BS = 4


@pytest.fixture(scope="module")
def model(model_dir, widen):
    m = load_model(model_dir)
    return widen(m) if m.config.arch == "gpt2" else m


_refs: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {args: tokens}


def ref(model, prompt, n, **kw):
    """``generate`` run alone (memoised per model)."""
    cache = _refs.setdefault(model, {})
    key = (tuple(prompt), n, tuple(sorted(kw.items())))
    if key not in cache:
        cache[key] = generate(model, prompt, n, stop_token_ids=[], **kw)
    return cache[key]


def greedy(n):
    return SamplingParams(max_new_tokens=n, ignore_eos=True)


def assert_no_leak(llm):
    assert not llm.has_unfinished()
    assert llm.block_manager.stats().blocks_in_use == 0
    assert not llm.scheduler.running and not llm.scheduler.waiting


def rand_tokens(rng, n):
    return [rng.randrange(1, 90) for _ in range(n)]


BASE = rand_tokens(random.Random(0), 14)
PROMPTS = [BASE[:5], BASE[:9], BASE, BASE + [7, 8, 9], [3], BASE[:8], BASE[:4] + [11, 12, 13, 14, 15, 16]]


# --------------------------------------------------------------------------- greedy
def test_greedy_equals_generate(model):
    llm = LLM(model, num_blocks=64, block_size=BS)
    outs = llm.generate(PROMPTS, greedy(8))
    for prompt, out in zip(PROMPTS, outs):
        assert out.error is None
        assert out.prompt_token_ids == prompt
        assert out.token_ids == ref(model, prompt, 8)
        assert out.finish_reason == "length"
        assert len(out.outputs) == 1 and out.outputs[0].index == 0
    assert llm.stats()["prefix_hit_tokens"] > 0  # the prompts share prefixes
    # a text prompt is encoded by the model's tokenizer (bytes here: "ABC" -> 65, 66, 67)
    (text_out,) = llm.generate("ABC", greedy(4))
    assert text_out.prompt_token_ids == llm.tokenizer.encode("ABC")
    assert text_out.token_ids == ref(model, text_out.prompt_token_ids, 4)
    assert llm.generate([], greedy(4)) == []
    with pytest.raises(ValueError):
        llm.generate(PROMPTS[:2], [greedy(3)])  # one SamplingParams per prompt, or a single one
    assert_no_leak(llm)


def test_sampling_params_validation():
    for bad in (dict(max_new_tokens=0), dict(n=0), dict(temperature=-1.0), dict(top_k=0), dict(top_p=0.0)):
        with pytest.raises(ValueError):
            SamplingParams(**bad)


def test_results_independent_of_batch_composition(model):
    target = BASE + [21, 22]
    others = PROMPTS[:5]
    alone = LLM(model, num_blocks=64, block_size=BS).generate([target], greedy(12))[0].token_ids
    assert alone == ref(model, target, 12)

    llm = LLM(model, num_blocks=64, block_size=BS)
    outs = llm.generate([others[0], target] + others[1:], greedy(12))
    assert outs[1].token_ids == alone
    assert llm.stats()["preemptions"] == 0

    # 8 blocks = 32 token slots for requests of up to 17 + 12 tokens each: preemption is forced
    tiny = LLM(model, num_blocks=8, block_size=BS)
    outs = tiny.generate(others[:2] + [target] + others[2:], greedy(12))
    assert tiny.stats()["preemptions"] > 0
    assert tiny.stats()["recomputed_tokens"] > 0
    assert outs[2].token_ids == alone
    for prompt, out in zip(others[:2] + [target] + others[2:], outs):
        assert out.token_ids == ref(model, prompt, 12)
        assert out.finish_reason == "length"
    assert_no_leak(tiny)


def test_small_batch_token_budget(model):
    """max_batch_tokens smaller than the prompts: prompts are admitted one forward at a time."""
    llm = LLM(model, num_blocks=64, block_size=BS, max_batch_tokens=6, max_num_seqs=2)
    outs = llm.generate(PROMPTS, greedy(5))
    for prompt, out in zip(PROMPTS, outs):
        assert out.token_ids == ref(model, prompt, 5)
    assert_no_leak(llm)


# ------------------------------------------------------------------- prefix caching
def test_prefix_caching(model):
    first, second = BASE, BASE[:11] + [40, 41, 42, 43]
    results = {}
    for caching in (True, False):
        llm = LLM(model, num_blocks=64, block_size=BS, enable_prefix_caching=caching)
        a = llm.generate([first], greedy(6))[0]
        hits_before = llm.stats()["prefix_hit_tokens"]
        b = llm.generate([second], greedy(6))[0]
        again = llm.generate([first], greedy(6))[0]
        assert a.metrics.cached_prompt_tokens == 0
        if caching:
            assert b.metrics.cached_prompt_tokens == 8  # the two full blocks shared with `first`
            # identical prompt: every full block but the one holding the last prompt token
            assert again.metrics.cached_prompt_tokens == 12
            for out in (b, again):
                assert out.metrics.cached_prompt_tokens % BS == 0
                assert 0 < out.metrics.cached_prompt_tokens < len(out.prompt_token_ids)
            assert llm.stats()["prefix_hit_tokens"] > hits_before
            assert llm.stats()["prefix_hit_tokens"] == 20
        else:
            assert b.metrics.cached_prompt_tokens == again.metrics.cached_prompt_tokens == 0
            assert llm.stats()["prefix_hit_tokens"] == 0
        results[caching] = [a.token_ids, b.token_ids, again.token_ids]
        assert_no_leak(llm)
    assert results[True] == results[False] == [ref(model, first, 6), ref(model, second, 6), ref(model, first, 6)]


def test_identical_prompts_in_one_step_share_blocks(model):
    """The second copy hits blocks registered by the first in the same step, whose KV is written
    in that same forward."""
    prompt = BASE + [5]
    llm = LLM(model, num_blocks=64, block_size=BS)
    outs = llm.generate([prompt, prompt, prompt[:13]], greedy(7))
    assert [o.metrics.cached_prompt_tokens for o in outs] == [0, 12, 12]
    for o in outs:
        assert o.token_ids == ref(model, o.prompt_token_ids, 7)
    assert_no_leak(llm)


def test_cache_salt_separates_prefix_cache(model):
    llm = LLM(model, num_blocks=64, block_size=BS)
    r1 = llm.add_request(BASE, greedy(3), cache_salt="a")
    r2 = llm.add_request(BASE, greedy(3), cache_salt="b")
    r3 = llm.add_request(BASE, greedy(3), cache_salt="a")
    while llm.has_unfinished():
        llm.step()
    outs = [llm.output(r) for r in (r1, r2, r3)]
    assert [o.metrics.cached_prompt_tokens for o in outs] == [0, 0, 12]
    assert all(o.token_ids == ref(model, BASE, 3) for o in outs)
    assert_no_leak(llm)


# ------------------------------------------------------------------ sampling, n > 1
def test_parallel_sampling(model):
    prompt = BASE[:10]  # not a multiple of the block size: the forks share a partial block
    params = SamplingParams(n=3, temperature=0.8, seed=1, max_new_tokens=10, ignore_eos=True)
    llm = LLM(model, num_blocks=64, block_size=BS)
    out = llm.generate([prompt], params)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    comps = [c.token_ids for c in out.outputs]
    assert all(len(c) == 10 for c in comps)
    assert len({tuple(c) for c in comps}) > 1
    assert llm.stats()["cow_copies"] > 0
    assert out.metrics.cached_prompt_tokens == 0
    assert_no_leak(llm)
    # completion i samples with seed + i, from logits equal to running alone
    for i, c in enumerate(comps):
        assert c == ref(model, prompt, 10, temperature=0.8, seed=1 + i)
    # reproducible with the same seed, even next to other requests
    llm2 = LLM(model, num_blocks=64, block_size=BS)
    outs2 = llm2.generate([PROMPTS[0], prompt, PROMPTS[2]], [greedy(4), params, greedy(6)])
    assert [c.token_ids for c in outs2[1].outputs] == comps
    assert_no_leak(llm2)


def test_max_num_seqs_counts_forked_children(model):
    """n > 1 children are forked after the prefill, outside admission: the limit must still hold."""
    llm = LLM(model, num_blocks=64, block_size=BS, max_num_seqs=3)
    pair = SamplingParams(n=2, max_new_tokens=6, ignore_eos=True)
    rids = [llm.add_request(p, sp) for p, sp in zip(PROMPTS[:4], [pair, pair, greedy(6), pair])]
    peak = 0
    while llm.has_unfinished():
        llm.step()
        peak = max(peak, len(llm.scheduler.running))
    assert peak == 3
    for rid, prompt in zip(rids, PROMPTS[:4]):
        out = llm.output(rid)
        assert all(c.token_ids == ref(model, prompt, 6) for c in out.outputs)
    assert_no_leak(llm)


def test_parallel_sampling_under_preemption(model):
    prompt = BASE[:10]
    params = SamplingParams(n=3, temperature=0.8, seed=1, max_new_tokens=10, ignore_eos=True)
    llm = LLM(model, num_blocks=9, block_size=BS)
    outs = llm.generate([prompt, PROMPTS[2]], [params, greedy(10)])
    assert llm.stats()["preemptions"] > 0
    assert [c.token_ids for c in outs[0].outputs] == [ref(model, prompt, 10, temperature=0.8, seed=1 + i)
                                                      for i in range(3)]
    assert outs[1].token_ids == ref(model, PROMPTS[2], 10)
    assert_no_leak(llm)


def test_parallel_greedy_completions_identical(model):
    prompt = BASE[:7]
    llm = LLM(model, num_blocks=64, block_size=BS)
    out = llm.generate([prompt], SamplingParams(n=2, max_new_tokens=8, ignore_eos=True))[0]
    assert [c.token_ids for c in out.outputs] == [ref(model, prompt, 8)] * 2
    assert all(c.finish_reason == "length" for c in out.outputs)
    assert_no_leak(llm)


def test_parallel_sampling_finishing_on_first_token(model):
    llm = LLM(model, num_blocks=64, block_size=BS)
    out = llm.generate([BASE[:6]], SamplingParams(n=2, max_new_tokens=1, ignore_eos=True))[0]
    assert [c.token_ids for c in out.outputs] == [ref(model, BASE[:6], 1)] * 2
    assert_no_leak(llm)


def test_seeded_sampling_independent_of_batch(model):
    prompt = BASE[:11]
    params = SamplingParams(temperature=0.9, top_k=20, seed=5, max_new_tokens=10, ignore_eos=True)
    alone = LLM(model, num_blocks=64, block_size=BS).generate([prompt], params)[0].token_ids
    assert alone == ref(model, prompt, 10, temperature=0.9, top_k=20, seed=5)
    llm = LLM(model, num_blocks=64, block_size=BS)
    mixed = [SamplingParams(temperature=1.0, seed=9, max_new_tokens=7, ignore_eos=True), params, greedy(9),
             SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=5, ignore_eos=True)]  # unseeded
    outs = llm.generate([PROMPTS[1], prompt, PROMPTS[3], PROMPTS[6]], mixed)
    assert outs[1].token_ids == alone
    assert outs[0].token_ids == ref(model, PROMPTS[1], 7, temperature=1.0, seed=9)
    assert len(outs[3].token_ids) == 5
    assert_no_leak(llm)


# --------------------------------------------------------------------------- errors
def test_request_that_can_never_fit_fails_at_once(model):
    llm = LLM(model, num_blocks=6, block_size=BS)  # 24 token slots
    ok1 = llm.add_request(PROMPTS[0], greedy(8))
    big = llm.add_request(BASE[:10], greedy(20))  # 30 tokens of KV
    ok2 = llm.add_request(PROMPTS[1], greedy(8))
    assert llm.requests[big].error  # rejected before any step
    assert llm.requests[ok1].error is None and llm.requests[ok2].error is None
    with pytest.raises(ValueError, match="not finished"):
        llm.output(ok1)  # and it stays queued
    reported = []
    while llm.has_unfinished():
        reported += [r.request_id for r in llm.step()]
    assert sorted(reported) == [ok1, big, ok2]  # the rejected one is reported like the others
    out = llm.output(big)
    assert out.error and "KV" in out.error
    assert out.outputs == [] and out.token_ids == [] and out.finish_reason == "error"
    for rid, prompt in ((ok1, PROMPTS[0]), (ok2, PROMPTS[1])):
        o = llm.output(rid)
        assert o.error is None and o.token_ids == ref(model, prompt, 8)
    assert_no_leak(llm)
    assert not llm.requests
    # alone, through step(): still reported, then nothing is left
    big = llm.add_request(BASE[:10], greedy(20))
    assert llm.has_unfinished()
    assert [r.request_id for r in llm.step()] == [big] and not llm.has_unfinished()
    assert llm.output(big).error and not llm.requests
    # through generate: returned in place, nothing left in llm.requests
    outs = llm.generate([PROMPTS[0], BASE[:10]], [greedy(8), greedy(20)])
    assert outs[0].token_ids == ref(model, PROMPTS[0], 8) and "KV" in outs[1].error
    assert not llm.requests
    assert_no_leak(llm)


def test_generate_keeps_reports_of_requests_added_outside_it(model):
    llm = LLM(model, num_blocks=64, block_size=BS)
    rid = llm.add_request(PROMPTS[1], greedy(3))
    (out,) = llm.generate([PROMPTS[0]], greedy(8))  # runs the earlier request to completion too
    assert out.token_ids == ref(model, PROMPTS[0], 8)
    assert [r.request_id for r in llm.step()] == [rid]  # its report was kept for the next step
    assert llm.output(rid).token_ids == ref(model, PROMPTS[1], 3)
    assert_no_leak(llm)
    running, waiting = llm.add_request(PROMPTS[1], greedy(3)), llm.add_request(PROMPTS[2], greedy(6))
    llm.scheduler.max_num_seqs = 1
    llm.step()  # the second stays queued behind the first
    assert len(llm.scheduler.running) == len(llm.scheduler.waiting) == 1
    llm.abort_request(running)
    llm.abort_request(waiting)
    assert not llm.requests
    assert_no_leak(llm)


def assert_untouched(llm):
    """Nothing queued, stored or allocated."""
    assert not llm.requests and not llm.has_unfinished()
    assert llm.block_manager.stats().blocks_in_use == 0 and llm.block_manager.stats().prefix_query_tokens == 0


def test_invalid_prompts_raise_and_queue_nothing(model):
    llm = LLM(model, num_blocks=128, block_size=BS)
    limit = model.config.max_positions
    bad = {"positions": [1] * (limit - 3), "empty": [], "vocabulary": [1, model.config.vocab_size]}
    for match, prompt in bad.items():
        with pytest.raises(ValueError, match=match):
            llm.add_request(prompt, greedy(5))
        with pytest.raises(ValueError, match=match):
            llm.generate([PROMPTS[0], prompt], greedy(5))  # the valid first prompt is not queued either
        assert_untouched(llm)
    for prompt in (5, None, [1, 2.0], [True], b"ab", [[1, 2]]):
        with pytest.raises(TypeError):
            llm.add_request(prompt, greedy(5))
        assert_untouched(llm)
    with pytest.raises(TypeError, match="prompt 1"):
        llm.generate(["AB", 5, "C"], greedy(5))
    with pytest.raises(ValueError, match="empty"):
        llm.generate("", greedy(5))
    assert_untouched(llm)
    # exactly at the limit is fine
    edge = rand_tokens(random.Random(5), limit - 4)
    (out,) = llm.generate([edge], greedy(4))
    assert out.error is None and out.token_ids == ref(model, edge, 4)
    assert not llm.requests
    assert_no_leak(llm)


def test_invalid_params_raise_and_queue_nothing(model):
    llm = LLM(model, num_blocks=64, block_size=BS, max_num_seqs=4)
    with pytest.raises(TypeError, match="SamplingParams"):
        llm.add_request(PROMPTS[0], {"max_new_tokens": 4})
    with pytest.raises(TypeError, match="SamplingParams"):
        llm.generate(PROMPTS[:2], [greedy(3), 7])
    with pytest.raises(TypeError, match="cache_salt"):
        llm.add_request(PROMPTS[0], greedy(3), cache_salt=["a"])
    with pytest.raises(ValueError, match="max_num_seqs"):
        llm.add_request(PROMPTS[0], SamplingParams(n=5))
    with pytest.raises(ValueError, match="stop_token_ids"):
        llm.add_request(PROMPTS[0], SamplingParams(stop_token_ids=[model.config.vocab_size]))
    assert_untouched(llm)


def test_constructor_rejects_bad_sizes(model):
    for name, value, error in (("block_size", 0, ValueError), ("max_num_seqs", 0, ValueError),
                               ("max_batch_tokens", 0, ValueError), ("num_blocks", 0, ValueError),
                               ("num_blocks", -3, ValueError), ("block_size", 2.0, TypeError),
                               ("max_num_seqs", True, TypeError)):
        with pytest.raises(error, match=name):
            LLM(model, **{"num_blocks": 8, name: value})


# ------------------------------------------------------------------ stopping, text
def _first_new_token(tokens, start):
    """Index k >= start such that tokens[k] does not occur in tokens[:k]."""
    for k in range(start, len(tokens)):
        if tokens[k] not in tokens[:k]:
            return k
    pytest.skip("no fresh token in the reference output")


def test_stop_token_ids_and_length(model):
    prompt = BASE[:6]
    full = ref(model, prompt, 12)
    k = _first_new_token(full, 2)
    llm = LLM(model, num_blocks=64, block_size=BS)
    stopped, capped = llm.generate([prompt, prompt], [
        SamplingParams(max_new_tokens=12, stop_token_ids=[full[k]], ignore_eos=True), greedy(4)])
    assert stopped.token_ids == full[:k + 1] and stopped.finish_reason == "stop"
    assert capped.token_ids == full[:4] and capped.finish_reason == "length"
    assert stopped.text == llm.tokenizer.decode(stopped.token_ids[:-1])  # the stop token's text is left out
    assert capped.text == llm.tokenizer.decode(capped.token_ids)
    for o in (stopped, capped):
        assert o.outputs[0].text == o.text
    assert_no_leak(llm)


def test_eos_stop_and_ignore_eos(model_dir, widen):
    model = load_model(model_dir)  # own copy: its tokenizer's EOS ids are changed below
    if model.config.arch == "gpt2":
        widen(model)
    prompt = BASE[:6]
    full = generate(model, prompt, 12, stop_token_ids=[])
    k = _first_new_token(full, 1)
    model.tokenizer.eos_token_ids = [full[k]]
    assert generate(model, prompt, 12) == full[:k + 1]  # generate's default stops at EOS too
    llm = LLM(model, num_blocks=64, block_size=BS)
    eos, ignored = llm.generate([prompt, prompt], [SamplingParams(max_new_tokens=12),
                                                   SamplingParams(max_new_tokens=12, ignore_eos=True)])
    assert eos.token_ids == full[:k + 1] and eos.finish_reason == "stop"
    assert ignored.token_ids == full and ignored.finish_reason == "length"
    assert_no_leak(llm)


def _first_occurrence_at_token(tokenizer, tokens, k, stop):
    """Does ``stop`` first occur in the decoded tokens exactly where token k's text starts?"""
    return tokenizer.decode(tokens).find(stop) == len(tokenizer.decode(tokens[:k]))


def test_stop_strings(model):
    """The text is cut before the stop string (as vLLM does); the token ids stay as generated."""
    prompt = BASE[:6]
    full = ref(model, prompt, 12)
    llm = LLM(model, num_blocks=64, block_size=BS)
    tok = llm.tokenizer
    k = _first_new_token(full, 2)
    one = tok.decode([full[k]])
    # a stop string spanning three tokens, first occurring at token j
    j = next((j for j in range(1, 9) if _first_occurrence_at_token(tok, full, j, tok.decode(full[j:j + 3]))), None)
    if j is None:
        pytest.skip("no three-token string occurs first where it starts in the reference output")
    multi = tok.decode(full[j:j + 3])
    outs = llm.generate([prompt, prompt, prompt], [
        SamplingParams(max_new_tokens=12, stop=[one], ignore_eos=True),
        SamplingParams(max_new_tokens=12, stop=multi, ignore_eos=True),  # a single str means [str]
        SamplingParams(max_new_tokens=12, stop=["never", multi], ignore_eos=True)])
    assert outs[0].token_ids == full[:k + 1] and outs[0].finish_reason == "stop"
    assert outs[0].text == tok.decode(full[:k])
    for out in outs[1:]:
        assert out.token_ids == full[:j + 3] and out.finish_reason == "stop"
        assert out.text == tok.decode(full[:j]) and multi not in out.text
    assert_no_leak(llm)


@pytest.fixture(scope="module")
def gpt2(gpt2_dir, widen):
    return widen(load_model(gpt2_dir))


def test_stop_string_newline(gpt2):
    """The widened GPT-2 fixture writes "\n" (byte 10) for many prompts; the Llama one never does."""
    for seed in range(20):
        prompt = rand_tokens(random.Random(seed), 6)
        full = ref(gpt2, prompt, 16)
        if 10 in full[1:]:
            break
    else:
        pytest.skip("no reference output with a newline")
    k = full.index(10)
    llm = LLM(gpt2, num_blocks=64, block_size=BS)
    out = llm.generate([prompt], SamplingParams(max_new_tokens=16, stop="\n", ignore_eos=True))[0]
    assert out.token_ids == full[:k + 1] and out.finish_reason == "stop"
    assert out.text == llm.tokenizer.decode(full[:k]) and "\n" not in out.text
    assert_no_leak(llm)


def test_stop_strings_decode_only_a_window(model):
    """Checking stop strings must not decode the whole output every step (O(n^2))."""
    llm = LLM(model, num_blocks=64, block_size=BS)
    decoded = []
    real = llm.tokenizer.decode

    def spy(ids):
        decoded.append(len(ids))
        return real(ids)

    rid = llm.add_request(BASE[:6], SamplingParams(max_new_tokens=40, stop=["\x00\x01\x02"], ignore_eos=True))
    llm.tokenizer.decode = spy
    try:
        while llm.has_unfinished():
            llm.step()
    finally:
        llm.tokenizer.decode = real
    out = llm.output(rid)
    assert len(out.token_ids) == 40 and out.finish_reason == "length"
    assert decoded and max(decoded) <= 2  # a one-byte-per-token tokenizer needs one token of context
    assert_no_leak(llm)


# -------------------------------------------------------------------------- metrics
def test_metrics(model):
    llm = LLM(model, num_blocks=64, block_size=BS)
    outs = llm.generate(PROMPTS[:3], greedy(6))
    for o in outs:
        m = o.metrics
        assert m.first_token_time is not None and m.finish_time is not None
        total = m.finish_time - m.arrival_time
        assert m.time_to_first_token is not None and 0 <= m.time_to_first_token <= total
        assert m.tokens_per_second(len(o.token_ids)) > 0
        assert m.tokens_per_second() == m.tokens_per_second(6)
        # reported without the caller counting: 5 tokens after the first, from first token to finish
        assert m.num_output_tokens == 6 and m.num_completions == 1
        assert m.output_tokens_per_second == pytest.approx(5 / (m.finish_time - m.first_token_time))
    pair, single = llm.generate([PROMPTS[0], PROMPTS[1]], [SamplingParams(n=2, max_new_tokens=4, ignore_eos=True),
                                                          greedy(1)])
    assert pair.metrics.num_output_tokens == 8 and pair.metrics.num_completions == 2
    assert pair.metrics.output_tokens_per_second == pytest.approx(
        6 / (pair.metrics.finish_time - pair.metrics.first_token_time))
    assert single.metrics.output_tokens_per_second is None  # nothing after the first token
    s = llm.stats()
    assert s["kv_blocks_total"] == 64 and s["kv_blocks_in_use"] == 0
    assert s["prefill_tokens_computed"] == sum(map(len, PROMPTS[:3] + PROMPTS[:2])) - s["prefix_hit_tokens"]
    assert 0 <= s["prefix_hit_rate"] <= 1
    assert_no_leak(llm)


# -------------------------------------------------------------------- kv memory
def test_parse_bytes():
    assert parse_bytes("1MiB") == 1 << 20
    assert parse_bytes("2GiB") == 2 << 30
    assert parse_bytes(123456) == 123456
    assert parse_bytes("512MB") == 512 << 20
    assert parse_bytes(" 1.5 G ") == 3 << 29
    assert parse_bytes("4096") == 4096
    assert parse_bytes("64kib") == 64 << 10
    for bad in ["", "abc", "1XB", "MiB", "-1MiB", "1 2MiB", "1..5M"]:
        with pytest.raises(ValueError):
            parse_bytes(bad)


def test_kv_memory_capacity(model):
    per_block = PagedKVCache.bytes_per_block(model.config, BS, model.dtype)
    llm = LLM(model, kv_memory="1MiB", block_size=BS)
    assert llm.num_blocks == (1 << 20) // per_block
    assert llm.cache.nbytes == llm.num_blocks * per_block <= 1 << 20
    assert llm.capacity_tokens == llm.num_blocks * BS
    assert llm.block_manager.num_blocks == llm.num_blocks
    for seq_len in (1, 4, 5, 100, llm.capacity_tokens):
        n = llm.max_concurrent(seq_len)
        assert n == llm.num_blocks // -(-seq_len // BS)
        assert n * -(-seq_len // BS) <= llm.num_blocks
    assert llm.max_concurrent(llm.capacity_tokens) == 1
    stats = llm.stats()
    assert stats["kv_capacity_tokens"] == llm.capacity_tokens and stats["kv_bytes"] == llm.cache.nbytes
    assert LLM(model, kv_memory=10 * per_block + 3, block_size=BS).num_blocks == 10
    assert LLM(model, kv_memory="1MiB", num_blocks=7, block_size=BS).num_blocks == 7
    with pytest.raises(ValueError):
        LLM(model, kv_memory="lots", block_size=BS)
    with pytest.raises(ValueError):
        LLM(model, kv_memory=per_block - 1, block_size=BS)


@pytest.mark.parametrize("threads", [1, 16], ids=["batched-matmul", "onednn-per-head"])
def test_shared_prefix_decodes_through_cascade_attention(model, threads, monkeypatch):
    """Sequences sharing cached prefix blocks attend to them once (cascade); results equal generate.

    ``threads`` steers the cascade's shared-prefix products (paged._heads_matmul): with few KV
    heads per thread it threads each head's product with oneDNN instead of a batched matmul."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    rng = random.Random(5)
    system = [rng.randrange(1, 90) for _ in range(37)]
    prompts = [system + [rng.randrange(1, 90) for _ in range(rng.randint(1, 6))] for _ in range(5)]
    llm = LLM(model, num_blocks=200, block_size=4)
    shared_seen = []
    original = llm.cache.prepare

    def spy(entries):
        original(entries)
        if llm.cache.plan.shared_blocks is not None:
            shared_seen.append(len(llm.cache.plan.shared_blocks))

    llm.cache.prepare = spy
    outs = llm.generate(prompts, greedy(12))
    assert shared_seen and max(shared_seen) >= 9  # 37 shared tokens = 9 full blocks of 4
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == ref(model, prompt, 12)
    assert_no_leak(llm)


# --------------------------------------------------------------------------- every accepted value works
@pytest.mark.parametrize("seed", [0, 2**64 - 1, -(2**63), -1])
def test_seeds_at_the_ends_of_their_range(model, seed):
    """n > 1 completions derive seed + index in torch's seed space (mod 2**64): every accepted seed works,
    and completion 0 is what generate draws with the same seed."""
    import numpy as np

    params = SamplingParams(max_new_tokens=4, temperature=1.0, seed=np.int64(seed) if seed == -1 else seed, n=3,
                            ignore_eos=True)
    out = LLM(model, num_blocks=64, block_size=BS).generate([BASE[:6]], params)[0]
    assert [len(o.token_ids) for o in out.outputs] == [4, 4, 4]
    assert out.outputs[0].token_ids == ref(model, BASE[:6], 4, temperature=1.0, seed=seed)


@pytest.mark.parametrize("temperature", [1e-45, 1e-30, 1e-7])
def test_tiny_temperatures_sample_the_argmax(model, temperature):
    want = ref(model, BASE[:6], 5)
    assert generate(model, BASE[:6], 5, stop_token_ids=[], temperature=temperature, seed=1) == want
    params = SamplingParams(max_new_tokens=5, temperature=temperature, seed=1, ignore_eos=True)
    assert LLM(model, num_blocks=64, block_size=BS).generate([BASE[:6]], params)[0].token_ids == want


def test_numpy_numbers_are_stored_as_python_numbers():
    import numpy as np

    params = SamplingParams(max_new_tokens=np.int64(3), temperature=np.float32(0.5), top_k=np.int32(5),
                            top_p=np.float64(0.9), n=np.int16(2), seed=np.uint64(7))
    for name in ("max_new_tokens", "top_k", "n", "seed"):
        assert type(getattr(params, name)) is int
    assert type(params.temperature) is float and type(params.top_p) is float


# --------------------------------------------------------------------------- misuse gets a message
def test_unknown_and_ended_request_ids_are_named(model):
    from kvcache.engine.llm import UnknownRequestError

    llm = LLM(model, num_blocks=64, block_size=BS)
    for call, words in [(lambda: llm.abort_request(12345), "cannot abort request 12345: this engine has no such"),
                        (lambda: llm.output("x"), "cannot collect the output of request 'x'")]:
        with pytest.raises(UnknownRequestError, match=words):
            call()
    aborted = llm.add_request(BASE[:5], greedy(3))
    llm.abort_request(aborted)
    with pytest.raises(UnknownRequestError, match=f"request {aborted}: it was already aborted"):
        llm.abort_request(aborted)
    done = llm.add_request(BASE[:5], greedy(2))
    while llm.has_unfinished():
        llm.step()
    llm.output(done)
    with pytest.raises(LookupError, match=f"request {done}: it was already collected"):
        llm.output(done)
    with pytest.raises(ValueError, match="held now: none"):  # also a ValueError: a bad argument
        llm.abort_request(999)


def test_numpy_integers_are_accepted_wherever_python_integers_are(model):
    import numpy as np

    from kvcache.generation.beam import beam_search
    from kvcache.memory import kv_cache_bytes

    prompt = np.array(BASE[:6])
    llm = LLM(model, num_blocks=np.int64(64), block_size=np.int64(BS), max_num_seqs=np.int32(8))
    out = llm.generate([list(np.array(BASE[:6]))], SamplingParams(max_new_tokens=np.int64(3), ignore_eos=True,
                                                                    stop_token_ids=np.array([0])))[0]
    assert out.token_ids == ref(model, BASE[:6], 3)
    assert llm.generate(list(prompt), greedy(2))[0].token_ids == ref(model, BASE[:6], 2)  # one prompt of np ints
    hyps = beam_search(model, prompt, np.int64(2), np.int64(3), stop_token_ids=[])
    assert [h.token_ids for h in hyps] == [h.token_ids for h in beam_search(model, BASE[:6], 2, 3,
                                                                               stop_token_ids=[])]
    assert kv_cache_bytes("gpt2", tokens=np.int64(10), batch=np.int64(2)) == kv_cache_bytes("gpt2", 10, 2)
    assert parse_bytes(np.int64(1024)) == 1024
