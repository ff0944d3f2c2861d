"""Reference beam search (contiguous cache) == transformers' beam search; selection logic; errors."""

from __future__ import annotations

import pytest
import torch

from kvcache.generation.beam import BeamSearch, beam_search
from kvcache.generation.generate import generate
from kvcache.model.loader import load_model

PROMPT = [3, 17, 42, 8, 29, 11, 5]


@pytest.fixture(scope="module")
def pair(model_dir):
    """(our model, the transformers model) from the same checkpoint."""
    from transformers import AutoModelForCausalLM

    return load_model(model_dir), AutoModelForCausalLM.from_pretrained(model_dir).eval()


def hf_beam(hf, width, new_tokens, length_penalty=1.0, eos=None):
    """transformers beam search: (new tokens cut after the first eos, normalised score) per returned beam."""
    hf.generation_config.eos_token_id = eos  # None: only max_new_tokens stops
    hf.generation_config.pad_token_id = 0
    out = hf.generate(torch.tensor([PROMPT]), num_beams=width, do_sample=False, max_new_tokens=new_tokens,
                      num_return_sequences=width, early_stopping=False, length_penalty=length_penalty,
                      return_dict_in_generate=True, output_scores=True)
    stops = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    result = []
    for seq, score in zip(out.sequences[:, len(PROMPT):].tolist(), out.sequences_scores.tolist()):
        cut = next((i + 1 for i, t in enumerate(seq) if t in stops), len(seq))
        result.append((seq[:cut], score))
    return result


def assert_same(ours, theirs):
    assert len(ours) == len(theirs)
    assert ours[0].token_ids == theirs[0][0]  # the best beam, at least
    assert [h.token_ids for h in ours] == [t for t, _ in theirs]
    torch.testing.assert_close([h.score for h in ours], [s for _, s in theirs], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("width", [2, 4])
def test_matches_transformers_without_stop_tokens(pair, width):
    model, hf = pair
    ours = beam_search(model, PROMPT, width, 20, stop_token_ids=[])
    assert len(ours) == width and all(len(h.token_ids) == 20 for h in ours)
    assert_same(ours, hf_beam(hf, width, 20))


@pytest.mark.parametrize("width,length_penalty,num_stops", [(2, 1.0, 1), (4, 0.0, 1), (4, -0.5, 1), (3, 2.0, 1),
                                                            (3, 0.0, 2)])
def test_matches_transformers_with_stop_tokens(pair, width, length_penalty, num_stops):
    """Stop tokens taken from a likely beam, so hypotheses really finish early (and the early-stop heuristic runs)."""
    model, hf = pair
    best = beam_search(model, PROMPT, width, 16, stop_token_ids=[])[0].token_ids
    stops = list(dict.fromkeys([best[3], best[5]]))[:num_stops]
    ours = beam_search(model, PROMPT, width, 16, length_penalty=length_penalty, stop_token_ids=stops)
    assert len(ours) == width
    if length_penalty <= 0:  # no reward for length: the short finished hypothesis wins
        assert len(ours[0].token_ids) < 16 and ours[0].token_ids[-1] in stops
    assert_same(ours, hf_beam(hf, width, 16, length_penalty, stops if num_stops > 1 else stops[0]))


def test_width_one_is_greedy(pair):
    model, _ = pair
    hyps = beam_search(model, PROMPT, 1, 24, stop_token_ids=[])
    assert len(hyps) == 1 and hyps[0].token_ids == generate(model, PROMPT, 24, stop_token_ids=[])
    # with a stop token that greedy decoding produces, beam width 1 also stops right there
    greedy = generate(model, PROMPT, 24, stop_token_ids=[])
    stop = greedy[6]
    assert beam_search(model, PROMPT, 1, 24, stop_token_ids=[stop])[0].token_ids == \
        generate(model, PROMPT, 24, stop_token_ids=[stop])


def test_results_sorted_and_normalised(pair):
    model, _ = pair
    best = beam_search(model, PROMPT, 4, 12, stop_token_ids=[])[0].token_ids
    for lp in (1.0, 0.5):
        hyps = beam_search(model, PROMPT, 4, 12, length_penalty=lp, stop_token_ids=[best[2]])
        scores = [h.score for h in hyps]
        assert scores == sorted(scores, reverse=True)
        for h in hyps:
            assert h.score == pytest.approx(h.logprob / len(h.token_ids) ** lp, rel=1e-5)
        # logprob is the sum of the tokens' log-probabilities under the model
        h = hyps[0]
        with torch.inference_mode():
            logits = model(torch.tensor([PROMPT + h.token_ids]))[0, len(PROMPT) - 1:-1].float()
        total = torch.log_softmax(logits, -1).gather(1, torch.tensor(h.token_ids)[:, None]).sum()
        assert h.logprob == pytest.approx(float(total), abs=1e-3)


def test_selection_logic_by_hand():
    """3-token vocabulary, stop token 2: hand-checked steps of the pure selection."""
    lg = lambda *rows: torch.log(torch.tensor(rows))  # noqa: E731  (log-probs given as probabilities)
    s = BeamSearch(2, 5, length_penalty=1.0, stop_token_ids=[2])
    assert s.num_candidates == 4
    assert s.advance(lg([0.5, 0.2, 0.3])) == [0, 0]  # stop token ranks 2nd (< width): finished
    assert s.sequences == [[0], [1]]
    assert [h.token_ids for h in s.finished] == [[2]]
    assert s.finished[0].score == pytest.approx(torch.log(torch.tensor(0.3)).item())
    parents = s.advance(lg([0.1, 0.1, 0.8], [0.6, 0.3, 0.1]))
    # candidates: (0,2)=.4 stop, (1,0)=.12, (1,1)=.06, (0,0)=.05 -> finished [0,2]; running [1,0], [1,1]
    assert parents == [1, 1] and s.sequences == [[1, 0], [1, 1]]
    assert [h.token_ids for h in s.finished] == [[0, 2], [2]]  # log(.4)/2 beats log(.3)/1
    # W finished, but best running log(.12)/2 > worst finished log(.3): go on
    assert not s.done
    parents = s.advance(lg([0.1, 0.1, 0.8], [0.5, 0.4, 0.1]))
    # candidates: (0,2)=.096 stop, (1,0)=.03, (1,1)=.024, ... -> [1,0,2] finished with log(.096)/3
    assert [h.token_ids for h in s.finished] == [[0, 2], [1, 0, 2]]
    # best running log(.03)/3 <= worst finished log(.096)/3: the heuristic stops (no parents returned)
    assert parents == [] and s.done
    hyps = s.results()
    assert [h.token_ids for h in hyps] == [[0, 2], [1, 0, 2]]
    assert hyps[1].logprob == pytest.approx(float(torch.log(torch.tensor(0.096))), rel=1e-5)
    assert hyps[1].score == pytest.approx(hyps[1].logprob / 3, rel=1e-6)
    with pytest.raises(RuntimeError):
        s.advance(lg([0.1, 0.1, 0.8], [0.5, 0.4, 0.1]))


def test_selection_finalises_top_width_at_max_new_tokens():
    lg = lambda *rows: torch.log(torch.tensor(rows))  # noqa: E731
    s = BeamSearch(2, 1, length_penalty=1.0, stop_token_ids=[2])
    assert s.advance(lg([0.45, 0.15, 0.4])) == [] and s.done
    # the top 2 candidates finish whether or not they are stop tokens; token 1 (rank 3) does not
    assert [h.token_ids for h in s.results()] == [[0], [2]]


def test_max_new_tokens_zero_and_validation(pair):
    model, _ = pair
    assert beam_search(model, PROMPT, 3, 0) == []
    for bad in (0, -1, 1.5, True, None):
        with pytest.raises(ValueError, match="beam_width"):
            beam_search(model, PROMPT, bad, 4)
    with pytest.raises(ValueError, match="empty prompt"):
        beam_search(model, [], 2, 4)
    with pytest.raises(ValueError, match="vocabulary"):
        beam_search(model, [model.config.vocab_size], 2, 4)
    with pytest.raises(ValueError, match="maximum"):
        beam_search(model, PROMPT, 2, model.config.max_positions)
    with pytest.raises(ValueError, match="stop token id"):
        beam_search(model, PROMPT, 2, 4, stop_token_ids=[10**6])
    with pytest.raises(ValueError, match="length_penalty"):
        beam_search(model, PROMPT, 2, 4, length_penalty=float("nan"))


def test_beam_search_takes_a_cache_spec(pair):
    model = pair[0]
    prompt = [1, 5, 9, 20]
    exact = beam_search(model, prompt, 3, 10, stop_token_ids=[])
    same = beam_search(model, prompt, 3, 10, stop_token_ids=[], cache="int4:residual=1000")
    assert [h.token_ids for h in same] == [h.token_ids for h in exact]
    assert [h.score for h in same] == pytest.approx([h.score for h in exact], rel=1e-5)
    lossy = beam_search(model, prompt, 3, 10, stop_token_ids=[], cache="int8:residual=0,group=16")
    assert len(lossy) == 3 and all(len(h.token_ids) == 10 for h in lossy)
    with pytest.raises(TypeError, match="cache spec string"):
        beam_search(model, prompt, 3, 10, cache=object())
