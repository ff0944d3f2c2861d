"""A request's sampling parameters, its sequences, and what comes back."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from enum import Enum

import torch

from ..generation.sampling import SamplingConfig


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    n: int = 1  # completions of one prompt, forked from one prefill
    seed: int | None = None
    stop: tuple[str, ...] | list[str] | None = None  # stop strings (checked on the decoded text)
    stop_token_ids: tuple[int, ...] | list[int] | None = None  # in addition to the model's EOS
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"n must be a positive integer, got {self.n!r}")
        self.sampling  # validates temperature/top_k/top_p

    @property
    def sampling(self) -> SamplingConfig:
        return SamplingConfig(self.temperature, self.top_k, self.top_p)


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_ids = itertools.count()


class Sequence:
    """One stream of tokens (a request has n of them).  ``tokens`` = prompt + output so far."""

    def __init__(self, request: "Request", tokens: list[int], index: int = 0):
        self.seq_id = next(_ids)
        self.request, self.index = request, index
        self.tokens = list(tokens)
        self.num_output = 0
        self.num_computed = 0  # tokens whose KV is in the cache
        self.status = Status.WAITING
        self.finish_reason: str | None = None
        seed = request.params.seed
        self.generator = torch.Generator().manual_seed(seed + index) if seed is not None else None

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
    text: str
    finish_reason: str | None


@dataclass
class RequestMetrics:
    arrival_time: float
    first_token_time: float | None = None
    finish_time: float | None = None
    cached_prompt_tokens: int = 0

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    def tokens_per_second(self, num_tokens: int) -> float | None:
        if self.finish_time is None or self.finish_time <= self.arrival_time:
            return None
        return num_tokens / (self.finish_time - self.arrival_time)


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
    def text(self) -> str:
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

    @property
    def finished(self) -> bool:
        return self.error is not None or (
            len(self.sequences) == self.params.n and all(s.status is Status.FINISHED for s in self.sequences))
