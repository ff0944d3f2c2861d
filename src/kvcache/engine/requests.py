"""The engine's intake and request registry: prompts checked, requests held by id until collected.

A request is validated like the single-stream path before anything is stored; one too big for the whole
pool is kept with ``error`` set and finished at once.  Ids that ended recently are remembered, so a
misused id is named with how it ended.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence as SequenceABC

import torch

from ..checks import is_int
from ..generation.generate import check_prompt
from .outputs import finish_metrics
from .sequence import Request, SamplingParams, Sequence

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "KB": 1 << 10, "KIB": 1 << 10, "M": 1 << 20, "MB": 1 << 20,
          "MIB": 1 << 20, "G": 1 << 30, "GB": 1 << 30, "GIB": 1 << 30, "T": 1 << 40, "TB": 1 << 40, "TIB": 1 << 40}


def parse_bytes(text: str | int) -> int:
    """'2GiB', '512MB', '1.5G' or an int -> bytes (binary units)."""
    if is_int(text):
        return int(text)
    m = re.fullmatch(r"\s*([\d.]+)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).upper() not in _UNITS:
        raise ValueError(f"cannot parse a memory size from {text!r} (examples: '2GiB', '512MB')")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


class UnknownRequestError(LookupError, ValueError):
    """A request id the engine does not hold (never added, aborted, or its output already collected)."""

    def __str__(self) -> str:  # not KeyError's quoted repr
        return str(self.args[0])


class RequestRegistry:
    """Requests by id, from ``add`` until ``collect`` or ``abort``; ``unreported`` holds requests that
    finished outside a step's own batch, for the next step to report."""

    def __init__(self, model, scheduler, block_manager, window, tokenizer):
        self.model, self.scheduler, self.block_manager, self.window = model, scheduler, block_manager, window
        self.tokenizer = tokenizer
        self.requests: dict[int, Request] = {}
        self.unreported: list[Request] = []
        self._ended: dict[int, str] = {}  # recent request ids no longer held -> how they ended, for errors
        self._next_id = 0

    def check(self, prompt, params, cache_salt) -> tuple[list[int], SamplingParams]:
        """The prompt's token ids and the params, validated like the single-stream path."""
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        if cache_salt is not None and not isinstance(cache_salt, str):
            raise TypeError(f"cache_salt must be a str or None, got {cache_salt!r}")
        if params.n > self.scheduler.max_num_seqs:
            raise ValueError(f"n={params.n} exceeds max_num_seqs={self.scheduler.max_num_seqs}: "
                             "its completions could never run together")
        if params.stop and self.tokenizer is None:
            raise ValueError(f"stop strings {list(params.stop)} need a tokenizer, and this model has none: "
                             "use stop_token_ids")
        vocab = self.model.config.vocab_size
        if any(t >= vocab for t in params.stop_token_ids):
            raise ValueError(f"stop_token_ids {list(params.stop_token_ids)} outside the vocabulary [0, {vocab})")
        return check_prompt(self.model, self.token_ids(prompt), params.max_new_tokens), params

    def token_ids(self, prompt):
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise TypeError("this model has no tokenizer: pass token ids, not text")
            return self.tokenizer.encode(prompt)
        if isinstance(prompt, (torch.Tensor, SequenceABC)):
            return prompt  # check_prompt takes it from here (and rejects bytes)
        raise TypeError(f"a prompt must be text or a list of token ids, got {type(prompt).__name__}")

    def add(self, ids: list[int], params: SamplingParams, cache_salt: str | None) -> int:
        """Hold a checked request and queue its first sequence (or finish it at once if it can never fit)."""
        request = Request(self._next_id, ids, params, cache_salt=cache_salt)
        self._next_id += 1
        bm = self.block_manager
        total = len(ids) + params.max_new_tokens
        need = bm.blocks_for(total)
        if self.window is not None:  # chunks of at most max_batch_tokens, blocks behind the window released
            need = min(need, self.window.blocks_held(bm.block_size, self.scheduler.max_batch_tokens))
        if need > bm.num_blocks:
            request.error = (f"request needs {total} tokens of KV but the whole pool holds "
                             f"{bm.num_blocks * bm.block_size} ({bm.num_blocks} blocks of {bm.block_size})")
            finish_metrics(request, time.perf_counter())
            self.unreported.append(request)
        else:
            seq = Sequence(request, ids, 0, self.tokenizer)
            request.sequences.append(seq)
            self.scheduler.add(seq)
        self.requests[request.request_id] = request
        return request.request_id

    def abort(self, request_id: int) -> None:
        request = self.get(request_id, "abort")
        del self.requests[request_id]
        self._end(request_id, "aborted")
        for seq in request.sequences:
            self.scheduler.abort(seq)
        self.unreported = [r for r in self.unreported if r is not request]

    def collect(self, request_id: int) -> Request:
        """A finished request, no longer held."""
        r = self.get(request_id, "collect the output of")
        if not r.finished:
            raise ValueError(f"request {request_id} is not finished: step until it is, or abort_request it")
        del self.requests[request_id]
        self._end(request_id, "collected (its output was returned)")
        return r

    def get(self, request_id, action: str) -> Request:
        if request_id in self.requests:
            return self.requests[request_id]
        if request_id in self._ended:
            raise UnknownRequestError(f"cannot {action} request {request_id}: it was already {self._ended[request_id]}")
        held = sorted(self.requests)[:8]
        raise UnknownRequestError(f"cannot {action} request {request_id!r}: this engine has no such request "
                                  f"(held now: {held if held else 'none'}{', ...' if len(self.requests) > 8 else ''})")

    def _end(self, request_id: int, how: str) -> None:
        self._ended[request_id] = how
        if len(self._ended) > 10_000:  # remember recent ids only
            del self._ended[next(iter(self._ended))]
