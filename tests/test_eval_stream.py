"""Streams through bounded caches: the per-token losses are those of the model over what the cache kept,
the recompute baseline is the model over the window before each position, and ``kvcache eval`` measures a
stream when given a window cache."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from kvcache.cli import main
from kvcache.eval_stream import evaluate_stream, recompute_baseline, stream_ids, with_curve
from kvcache.model.loader import load_model


@pytest.fixture(scope="module")
def model():
    return load_model()


def test_a_window_that_evicts_nothing_gives_the_exact_losses(model):
    ids = stream_ids(model, 300, "mixed")
    with torch.inference_mode():
        logits = model(torch.tensor([ids[:-1]]))[0]
    exact = (-F.log_softmax(logits, -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]).tolist()
    for spec in ("window:size=300,sinks=0", "window:size=250,sinks=50", "window:size=300,positions=absolute"):
        got = evaluate_stream(model, spec, ids, chunk=64)
        torch.testing.assert_close(torch.tensor(got.nll), torch.tensor(exact), atol=1e-3, rtol=1e-4)
        assert got.positions == list(range(1, 300)) and got.kv_bytes > 0


def test_recompute_predicts_each_position_from_the_window_before_it(model):
    ids = stream_ids(model, 200, "code")
    base = recompute_baseline(model, ids, window=64, stride=25, batch=3)
    assert base.positions == list(range(64, 200, 25))
    for t, nll in zip(base.positions, base.nll):
        with torch.inference_mode():
            logits = model(torch.tensor([ids[t - 64:t]]))[0, -1]
        assert math.isclose(nll, -F.log_softmax(logits, -1)[ids[t]].item(), rel_tol=1e-4, abs_tol=1e-4)


def test_curves_and_restriction(model):
    ids = stream_ids(model, 600, "english")
    streamed = evaluate_stream(model, "window:size=100,sinks=4", ids)
    base = recompute_baseline(model, ids, window=104, stride=50)
    at = with_curve(streamed.at(base.positions), bucket=200)
    assert at.positions == base.positions and len(at.curve) == 3
    assert all(ppl > 1 for _, ppl in at.curve)
    with pytest.raises(ValueError, match="fewer than max_tokens"):
        stream_ids(model, 10 ** 8, "english")


def test_kvcache_eval_measures_a_stream_past_the_context(capsys):
    assert main(["eval", "--corpus", "mixed", "--max-tokens", "1024", "--kv-cache", "window:size=124,sinks=4",
                 "--recompute", "128", "--recompute-stride", "64", "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["cache"] for r in lines] == ["window:size=124,sinks=4", "recompute:window=128"]
    assert all(r["stream_tokens"] == 1024 and r["perplexity"] > 1 and len(r["curve"]) == 4 for r in lines)
    assert main(["eval", "--max-tokens", "600", "--kv-cache", "window:size=64", "--recompute", "1"]) == 2
    assert "--recompute must be >= 2" in capsys.readouterr().err
