"""A request's sampling parameters, its sequences, and what comes back."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from enum import Enum

import torch

from ..checks import check_int
from ..generation.detokenizer import Detokenizer
from ..generation.sampling import SamplingConfig
from ..generation.speculative import PromptLookup, check_spec
from ..generation.validation import check_seed, derived_seed, token_id_list


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one request; checked here, so a bad value fails before it reaches the engine."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    n: int = 1  # completions of one prompt, forked from one prefill
    seed: int | None = None
    stop: str | tuple[str, ...] | list[str] | None = None  # stop strings, cut from the text (a str means [str])
    stop_token_ids: tuple[int, ...] | list[int] | None = None  # in addition to the model's EOS
    ignore_eos: bool = False
    speculative: str | None = None  # "prompt-lookup[:ngram=3,min_ngram=2,k=8]": draft and verify per step

    def __post_init__(self) -> None:
        for name in ("max_new_tokens", "n"):
            object.__setattr__(self, name, check_int(getattr(self, name), name, minimum=1))
        config = self.sampling  # SamplingConfig checks temperature, top_k and top_p; keep its plain numbers
        for name in ("temperature", "top_k", "top_p"):
            object.__setattr__(self, name, getattr(config, name))
        object.__setattr__(self, "seed", check_seed(self.seed))
        if not isinstance(self.ignore_eos, bool):
            raise TypeError(f"ignore_eos must be a bool, got {self.ignore_eos!r}")
        object.__setattr__(self, "stop", _stop_strings(self.stop))
        object.__setattr__(self, "stop_token_ids", _stop_ids(self.stop_token_ids))
        if self.speculative is not None:
            kind, _, _ = check_spec(self.speculative)
            if kind != "prompt-lookup":
                raise ValueError(f"speculative={self.speculative!r}: the engine speculates with prompt lookup "
                                 "(draft models run in single-stream generate)")

    @property
    def sampling(self) -> SamplingConfig:
        return SamplingConfig(self.temperature, self.top_k, self.top_p)


def _stop_strings(stop) -> tuple[str, ...]:
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
        raise TypeError(f"stop must be a str or a list of str, got {stop!r}")
    if not all(stop):
        raise ValueError("stop strings must not be empty")
    return tuple(stop)


def _stop_ids(ids) -> tuple[int, ...]:
    if ids is None:
        return ()
    ids = token_id_list(ids, "stop_token_ids")  # a list, tuple, tensor or array of integers
    if any(i < 0 for i in ids):
        raise ValueError(f"stop_token_ids must be >= 0, got {list(ids)}")
    return tuple(int(i) for i in ids)


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_ids = itertools.count()


class Sequence:
    """One stream of tokens (a request has n of them).  ``tokens`` = prompt + output so far."""

    def __init__(self, request: "Request", tokens: list[int], index: int = 0, tokenizer=None):
        self.seq_id = next(_ids)
        self.request, self.index = request, index
        self.tokens = list(tokens)
        self.num_output = 0
        self.num_computed = 0  # tokens whose KV is in the cache
        self.status = Status.WAITING
        self.finish_reason: str | None = None
        # the output's text, built token by token (None without a tokenizer: the token ids are the output)
        self.detokenizer = Detokenizer(tokenizer, request.params.stop) if tokenizer is not None else None
        self.num_reported = 0  # output tokens already handed out as deltas
        self.reported_finish = False
        seed = request.params.seed
        self.generator = torch.Generator().manual_seed(derived_seed(seed, index)) if seed is not None else None
        spec = request.params.speculative
        self.proposer = PromptLookup(**check_spec(spec)[2]) if spec else None
        self.draft: list[int] = []  # tokens proposed for the pass being run, not yet accepted
        # KV tiers (engine/tiering.py): chunks handed to the tiers, the last one's key, the cached probe
        self.tier_chunks, self.tier_key, self.tier_probe = 0, None, None

    @property
    def output_ids(self) -> list[int]:
        return self.tokens[len(self.tokens) - self.num_output:] if self.num_output else []

    def append(self, token: int) -> None:
        self.tokens.append(token)
        self.num_output += 1


@dataclass
class CompletionOutput:
    index: int
    token_ids: list[int]
    text: str | None  # None when the model has no tokenizer
    finish_reason: str | None


@dataclass
class CompletionDelta:
    """What one completion added since the last report (text may lag the tokens: see generation/detokenizer.py)."""

    index: int
    token_ids: list[int]
    text: str | None
    finish_reason: str | None  # set once, in the completion's last delta


@dataclass
class RequestDelta:
    """One request's progress in a step: ``LLM.step_deltas`` returns these, for streaming."""

    request_id: int
    outputs: list[CompletionDelta]
    finished: bool
    metrics: "RequestMetrics"
    error: str | None = None


@dataclass
class RequestMetrics:
    arrival_time: float
    first_token_time: float | None = None
    finish_time: float | None = None
    cached_prompt_tokens: int = 0
    drafted_tokens: int = 0  # speculative decoding, over all completions
    accepted_tokens: int = 0
    decode_passes: int = 0  # forward passes after the first token, over all completions
    num_output_tokens: int = 0  # over all completions, set when the request finishes
    num_completions: int = 0
    released_blocks: int = 0  # KV blocks given back from behind a sliding window, over all completions
    kv_bytes_peak: int = 0  # most KV bytes one completion held at once (its blocks, shared ones included)

    @property
    def tokens_per_pass(self) -> float | None:
        """Tokens each forward pass after the first produced (above 1 only with speculative decoding)."""
        later = self.num_output_tokens - self.num_completions
        return later / self.decode_passes if self.decode_passes else None

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def output_tokens_per_second(self) -> float | None:
        """Decode speed: tokens produced after the first step, per second from the first token to the
        finish (vLLM's 1 / time per output token).  None with nothing after the first step."""
        if self.first_token_time is None or self.finish_time is None:
            return None
        later, span = self.num_output_tokens - self.num_completions, self.finish_time - self.first_token_time
        return later / span if later > 0 and span > 0 else None

    def tokens_per_second(self, num_tokens: int | None = None) -> float | None:
        """``num_tokens`` (default: all output tokens) per second from arrival to finish."""
        if self.finish_time is None or self.finish_time <= self.arrival_time:
            return None
        count = self.num_output_tokens if num_tokens is None else num_tokens
        return count / (self.finish_time - self.arrival_time)


@dataclass
class RequestOutput:
    request_id: int
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    metrics: RequestMetrics
    error: str | None = None

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids if self.outputs else []

    @property
    def text(self) -> str | None:
        return self.outputs[0].text if self.outputs else ""

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason if self.outputs else "error"


@dataclass
class Request:
    request_id: int
    prompt_ids: list[int]
    params: SamplingParams
    metrics: RequestMetrics = field(default_factory=lambda: RequestMetrics(time.perf_counter()))
    sequences: list[Sequence] = field(default_factory=list)
    error: str | None = None
    cache_salt: str | None = None  # requests with different salts never share cached KV
    reported: bool = False  # its last delta (finished) was handed out

    @property
    def finished(self) -> bool:
        return self.error is not None or (
            len(self.sequences) == self.params.n and all(s.status is Status.FINISHED for s in self.sequences))
