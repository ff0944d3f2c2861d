"""Beam search: the pure selection logic, and a reference driver on a contiguous cache.

The selection (:class:`BeamSearch`) knows nothing about models or caches: it is
fed the last-position logits of every running beam and answers which running
beam each new beam continues (its *parent*).  Two drivers share it:

* :func:`beam_search` (here), the reference: one contiguous cache (any spec) whose
  batch rows are the beams, prefilled once with batch 1, then reordered with
  ``select(parents)`` every step.  ``select`` copies every beam's whole cache,
  O(W * T) bytes per step: simple, and exactly what paged memory avoids.
* ``kvcache.engine.paged_beam.paged_beam_search``: beams are sequences of the
  engine's block manager that share blocks (fork + copy-on-write).

Semantics follow transformers 5.x ``GenerationMixin._beam_search`` with
``do_sample=False`` and ``early_stopping=False`` (read in transformers 5.23):

* Each step: ``log_softmax`` of the logits in float32, plus the beam's
  cumulative log-probability (float32, as transformers accumulates), then the
  top ``K = max(2, 1 + n_stop) * W`` (beam, token) candidates over all beams.
  With one (or no) stop token K is 2W; with several, K grows so that at least
  W candidates are not stop tokens.
* A stop-token candidate that ranks in the first W becomes a finished
  hypothesis (lower-ranked ones are dropped); the first W non-stop candidates
  are the next running beams.  The finished set keeps the W best scores.
* Normalisation: ``score = logprob / generated_len ** length_penalty``, where
  ``generated_len`` counts the NEW tokens only, including the stop token
  (transformers: ``cur_len + 1 - decoder_prompt_len``), not prompt + new.
* Stop early (``early_stopping=False`` heuristic) once W hypotheses are
  finished and ``best running logprob / generated_len ** length_penalty <=
  worst finished score``, with generated_len the running beams' current
  length.  Running beams are then discarded, as in transformers.
* At ``max_new_tokens`` every one of the top W candidates of the last step is
  finalised (transformers' max-length criterion marks them all as finished),
  stop token or not, with the same normalisation; the best W overall are
  returned, best first.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..caches.base import Cache
from ..caches.registry import make_cache
from ..checks import is_int
from .validation import check_prompt, resolve_stop_ids

__all__ = ["BeamHypothesis", "BeamSearch", "beam_search", "check_beam_args", "resolve_stop_ids"]


@dataclass
class BeamHypothesis:
    """One finished beam: its new tokens (not the prompt), normalised score and summed log-probability."""

    token_ids: list[int]
    score: float
    logprob: float


def check_beam_args(beam_width, length_penalty) -> None:
    if not is_int(beam_width) or beam_width < 1:
        raise ValueError(f"beam_width must be an integer >= 1, got {beam_width!r}")
    if isinstance(length_penalty, bool) or not isinstance(length_penalty, (int, float)) \
            or length_penalty != length_penalty or abs(length_penalty) == float("inf"):
        raise ValueError(f"length_penalty must be a finite number, got {length_penalty!r}")


class BeamSearch:
    """Selection state of one beam search; no model, no cache.

    Usage: ``parents = search.advance(logits)`` with ``logits`` (num_running,
    vocab) for the running beams in ``search.sequences`` order (one row after
    the prefill).  Unless ``search.done``, new running beam ``i`` continues old
    beam ``parents[i]`` with token ``search.sequences[i][-1]``: reorder/fork
    the caches accordingly and feed those tokens.  ``results()`` at the end.
    """

    def __init__(self, beam_width: int, max_new_tokens: int, length_penalty: float = 1.0,
                 stop_token_ids: Sequence[int] = ()):
        check_beam_args(beam_width, length_penalty)
        if not is_int(max_new_tokens) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
        self.width = beam_width
        self.max_new_tokens = max_new_tokens
        self.length_penalty = float(length_penalty)
        self.stops = frozenset(stop_token_ids)
        self.num_candidates = max(2, 1 + len(self.stops)) * beam_width
        self.sequences: list[list[int]] = [[]]  # new tokens of each running beam
        self.scores = torch.zeros(1, dtype=torch.float32)  # cumulative log-probs of the running beams
        self.finished: list[BeamHypothesis] = []  # at most `width`, best first
        self.length = 0  # tokens generated so far by the running beams
        self.done = max_new_tokens == 0

    def _norm(self, length: int) -> float:
        return float(length) ** self.length_penalty

    def _finish(self, hyp: BeamHypothesis) -> None:
        self.finished.append(hyp)
        self.finished.sort(key=lambda h: h.score, reverse=True)  # stable: earlier wins ties
        del self.finished[self.width:]

    def advance(self, logits: torch.Tensor) -> list[int]:
        """Consume one step of logits; return each new running beam's parent index ([] once done)."""
        if self.done:
            raise RuntimeError("advance() called on a finished beam search")
        if logits.dim() != 2 or logits.shape[0] != len(self.sequences):
            raise ValueError(f"expected logits of shape ({len(self.sequences)}, vocab), got {tuple(logits.shape)}")
        vocab = logits.shape[1]
        logprobs = torch.log_softmax(logits.float(), dim=-1) + self.scores[:, None]
        k = min(self.num_candidates, logprobs.numel())
        top, index = torch.topk(logprobs.flatten(), k)
        parents, tokens = (index // vocab).tolist(), (index % vocab).tolist()
        self.length += 1
        last = self.length == self.max_new_tokens
        normed = (top / self._norm(self.length)).tolist()
        top_list = top.tolist()
        keep: list[int] = []  # candidate ranks that continue
        for rank, (p, t) in enumerate(zip(parents, tokens)):
            stop = t in self.stops
            if rank < self.width and (stop or last):
                self._finish(BeamHypothesis(self.sequences[p] + [t], normed[rank], top_list[rank]))
            if not stop and not last and len(keep) < self.width:
                keep.append(rank)
        if not keep:  # max_new_tokens reached (or a vocabulary of stop tokens only)
            self.done = True
            return []
        self.sequences = [self.sequences[parents[r]] + [tokens[r]] for r in keep]
        self.scores = top[keep]
        if len(self.finished) == self.width:
            best_possible = float(self.scores[0] / self._norm(self.length))
            if best_possible <= self.finished[-1].score:
                self.done = True
                return []
        return [parents[r] for r in keep]

    def results(self) -> list[BeamHypothesis]:
        """The best (at most) ``beam_width`` hypotheses, best first."""
        return list(self.finished)


def start_search(model, tokenizer, prompt_ids, beam_width: int, max_new_tokens: int, length_penalty: float,
                 stop_token_ids: Sequence[int] | None) -> tuple[list[int], "BeamSearch"]:
    """Validate a beam-search request; the prompt as a list and a fresh ``BeamSearch``."""
    check_beam_args(beam_width, length_penalty)
    ids = check_prompt(model, prompt_ids, max_new_tokens)
    stops = resolve_stop_ids(tokenizer, stop_token_ids, model.config.vocab_size)
    return ids, BeamSearch(beam_width, max_new_tokens, length_penalty, stops)


def beam_search(
    model,
    prompt_ids: Sequence[int] | torch.Tensor,
    beam_width: int,
    max_new_tokens: int,
    length_penalty: float = 1.0,
    stop_token_ids: Sequence[int] | None = None,
    cache: str | None = None,
) -> list[BeamHypothesis]:
    """Reference beam search on one cache; ``beam_width`` hypotheses, best first.

    cache: a cache spec (``"int8"``...; default full precision): its ``select`` reorders the beams.

    stop_token_ids defaults to the model's EOS ids; ``[]`` disables stopping.
    ``max_new_tokens=0`` returns ``[]``.  (Fewer than ``beam_width`` results
    only if the vocabulary has fewer than ``beam_width`` non-stop tokens.)
    """
    ids, search = start_search(model, model.tokenizer, prompt_ids, beam_width, max_new_tokens, length_penalty,
                               stop_token_ids)
    if search.done:
        return []
    if cache is not None and not isinstance(cache, str):
        raise TypeError(f"cache must be a cache spec string or None, got {type(cache).__name__}")
    with torch.inference_mode():
        kv: Cache = make_cache(cache, model, batch=1, capacity=len(ids) + max_new_tokens)
        logits = model(torch.tensor([ids]), cache=kv, logits_index=slice(-1, None))
        while True:
            parents = search.advance(logits)
            if search.done:
                break
            kv.select(parents)  # the first step duplicates the prompt's cache: select([0] * W)
            last = torch.tensor([[seq[-1]] for seq in search.sequences])
            logits = model(last, cache=kv, logits_index=slice(None))
    return search.results()
