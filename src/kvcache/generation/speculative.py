"""Speculative decoding: a cheap proposer guesses the next tokens, the model scores them all in one pass over
its cache, the accepted prefix is kept and the cache is cropped past the first rejection.

Greedy: a draft token is kept iff it is the model's argmax at its position, so the output is plain greedy's
token for token.  Sampling: a token drafted with probability ``q(x)`` is kept with probability
``min(1, p(x) / q(x))``; at the first rejection the token is drawn from ``norm(max(0, p - q))``, and when every
draft is kept one more is drawn from ``p`` (Leviathan et al. 2023; Chen et al. 2023), so the output
distribution is exactly plain sampling's.  Prompt lookup drafts deterministically (``q`` one-hot).

Specs, like the cache specs: ``prompt-lookup[:ngram=3,min_ngram=2,k=8,adaptive=1]`` and
``draft:MODEL[,k=4]`` (a model name or folder sharing the target's tokenizer).  The draft length ``k`` adapts
(+2 after a fully accepted draft, -1 otherwise) unless ``adaptive=0``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from ..caches.base import Cache, Option
from ..caches.registry import make_cache
from ..checks import check_int
from .sampling import SamplingConfig, probs, sample

MAX_K = 32


@dataclass
class SpeculationStats:
    passes: int = 0  # target forward passes after the prefill
    drafted: int = 0
    accepted: int = 0
    emitted: int = 0  # tokens produced by those passes

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_pass(self) -> float:
        return self.emitted / self.passes if self.passes else 0.0

    def __str__(self) -> str:
        return (f"{self.drafted} drafted, {self.accepted} accepted ({100 * self.acceptance_rate:.1f}%), "
                f"{self.tokens_per_pass:.2f} tokens per target pass over {self.passes} passes")


class Proposer:
    """Guesses continuations; ``k`` is the current draft length."""

    def __init__(self, k: int, adaptive: bool):
        self.k = check_int(k, "k", minimum=1)
        self.adaptive = bool(adaptive)
        self.max_k = MAX_K  # lowered to what the caches can roll back (check_rollback)
        self.stats = SpeculationStats()

    def start(self, model, prompt: list[int]) -> None:
        """A new generation begins."""

    def propose(self, context: list[int], limit: int, config: SamplingConfig,
                generator: torch.Generator | None) -> tuple[list[int], torch.Tensor | None]:
        """Up to ``limit`` draft tokens after ``context``, and their draft distributions (None: deterministic)."""
        raise NotImplementedError

    def rollback(self, kept: int) -> None:
        """The first ``kept`` tokens of context + draft are final."""

    def update(self, drafted: int, accepted: int) -> None:
        if self.adaptive and drafted:
            self.k = min(self.max_k, self.k + 2) if accepted == drafted == self.k else max(1, self.k - 1)

    def fit_rollback(self, cache: Cache, whose: str) -> None:
        """Refuse a draft length ``cache`` cannot take back, before any token; cap adaptive growth at it."""
        limit = getattr(cache, "max_rollback", None)
        if limit is None:
            return
        option = getattr(cache, "rollback_option", "its rollback limit")
        if self.k > limit:
            raise ValueError(f"speculative k={self.k} is longer than {whose} cache can roll back: a rejected draft "
                             f"is cropped away, and it takes back at most {option}={limit} positions; use k <= "
                             f"{limit} or a larger {option}" if limit else
                             f"speculative decoding crops rejected drafts, and {whose} cache has {option}=0: it "
                             f"cannot take any position back; give it {option} >= k={self.k}")
        self.max_k = min(self.max_k, limit)


class PromptLookup(Proposer):
    """Copies what followed the most recent earlier occurrence of the context's last n tokens (longest n first)."""

    def __init__(self, ngram: int = 3, min_ngram: int = 2, k: int = 8, adaptive: bool = True):
        super().__init__(k, adaptive)
        self.start(None, [])
        self.ngram = check_int(ngram, "ngram", minimum=1)
        self.min_ngram = check_int(min_ngram, "min_ngram", minimum=1)
        if self.min_ngram > self.ngram:
            raise ValueError(f"min_ngram ({min_ngram}) must be <= ngram ({ngram})")

    def start(self, model, prompt):
        self._buffer, self._length = np.empty(0, dtype=np.int64), 0

    def _tokens(self, context: list[int]) -> np.ndarray:
        """``context`` as an array, converting only what was appended since the last call (contexts only grow
        within one generation; ``start`` begins another)."""
        n = len(context)
        if n < self._length:
            self._length = 0
        if n > len(self._buffer):
            grown = np.empty(max(n, 2 * len(self._buffer), 256), dtype=np.int64)
            grown[: self._length] = self._buffer[: self._length]
            self._buffer = grown
        self._buffer[self._length:n] = context[self._length:n]
        self._length = n
        return self._buffer[:n]

    def propose(self, context, limit, config, generator):
        if limit < 1 or len(context) < 2:
            return [], None
        tokens = self._tokens(context)
        # n-grams ending at i (i < last, so a continuation exists) that end like the context: one pass over the
        # context for its last token, then only the candidates are compared further back (longest n first)
        ends = np.flatnonzero(tokens[:-1] == tokens[-1])
        for n in range(min(self.ngram, len(tokens) - 1), self.min_ngram - 1, -1):
            hits = ends[ends >= n - 1]
            for back in range(1, n):
                hits = hits[tokens[hits - back] == tokens[-1 - back]]
            if hits.size:
                start = int(hits[-1]) + 1
                return tokens[start:start + min(limit, self.k)].tolist(), None
        return [], None


class DraftModel(Proposer):
    """A smaller model with the same vocabulary drafts with its own cache, cropped with the target's."""

    def __init__(self, model, k: int = 4, adaptive: bool = True, cache: str | None = None):
        super().__init__(k, adaptive)
        self.model, self.cache_spec = model, cache
        self.cache: Cache | None = None

    def start(self, model, prompt):
        if self.model.config.vocab_size != model.config.vocab_size:
            raise ValueError(f"the draft model's vocabulary ({self.model.config.vocab_size}) is not the target's "
                             f"({model.config.vocab_size}): they must share a tokenizer")
        self.cache = make_cache(self.cache_spec, self.model, batch=1, capacity=self.model.config.max_positions)
        self.fit_rollback(self.cache, "the draft model's")

    def propose(self, context, limit, config, generator):
        limit = min(limit, self.k, self.model.config.max_positions - len(context))
        if limit < 1:
            return [], None
        tokens, dists = [], []
        feed = context[len(self.cache):]
        for _ in range(limit):
            logits = self.model(torch.tensor([feed]), cache=self.cache, logits_index=slice(-1, None))
            dist = probs(logits, config)[0]
            token = int(dist.argmax()) if config.greedy else _draw(dist, generator)
            tokens.append(token)
            dists.append(dist)
            feed = [token]
        return tokens, torch.stack(dists)

    def rollback(self, kept):
        if len(self.cache) > kept:
            self.cache.crop(kept)


def _options(spec: str, text: str, accepted: dict[str, Option]) -> dict:
    options = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, eq, value = item.partition("=")
        if not eq or key not in accepted:
            raise ValueError(f"speculative spec {spec!r}: unknown option {item!r} (options: {', '.join(accepted)})")
        try:
            options[key] = accepted[key].parse(key, value)
        except ValueError as exc:
            raise ValueError(f"speculative spec {spec!r}: {exc}") from None
    return options


# types only: the proposers (and first_layers) check ranges and own the defaults, naming the argument
LOOKUP_OPTIONS = {"ngram": Option(int, None, "longest n-gram matched"), "min_ngram": Option(int, None, "shortest"),
                  "k": Option(int, None, "draft length to start with"), "adaptive": Option(bool, None, "adapt k")}
DRAFT_OPTIONS = {"k": Option(int, None, "draft length to start with"), "adaptive": Option(bool, None, "adapt k"),
                 "cache": Option(str, None, "the draft's cache spec"),
                 "layers": Option(int, None, "use only the model's first N layers")}


def check_spec(spec: str) -> tuple[str, str, dict]:
    """``(kind, draft model or "", options)`` of a spec string; ValueError naming what is wrong."""
    if not isinstance(spec, str):
        raise TypeError(f"speculative must be a spec string or a Proposer, got {type(spec).__name__}")
    name, _, rest = spec.strip().partition(":")
    if name == "prompt-lookup":
        options = _options(spec, rest, LOOKUP_OPTIONS)
        PromptLookup(**options)  # ranges checked here
        return name, "", options
    if name == "draft":
        target, _, opts = rest.partition(",")
        if not target.strip():
            raise ValueError(f"speculative spec {spec!r}: name the draft model, e.g. 'draft:path/to/model'")
        options = _options(spec, opts, DRAFT_OPTIONS)
        for key in ("k", "layers"):
            if key in options:
                check_int(options[key], key, minimum=1)
        return name, target.strip(), options
    raise ValueError(f"unknown speculative proposer {name!r}: use 'prompt-lookup[:ngram=3,min_ngram=2,k=8]' or "
                     "'draft:MODEL[,k=4,layers=N]'")


def make_proposer(spec: str | Proposer, load=None) -> Proposer:
    """A proposer from a spec string (see the module docstring) or the object itself."""
    if isinstance(spec, Proposer):
        return spec
    name, target, options = check_spec(spec)
    if name == "prompt-lookup":
        return PromptLookup(**options)
    from ..model.loader import load_model

    draft = (load or load_model)(target)
    layers = options.pop("layers", None)
    if layers is not None:
        draft = first_layers(draft, layers)
    return DraftModel(draft, **options)


def first_layers(model, n: int):
    """The model cut after its first ``n`` layers (its own norm and head kept): a draft that shares every weight
    and the tokenizer with the full model, as in early-exit self-speculation (LayerSkip)."""
    import copy
    import dataclasses

    n = check_int(n, "layers", minimum=1)
    if n >= model.config.num_layers:
        raise ValueError(f"layers={n}: the model has only {model.config.num_layers} layers")
    draft = copy.copy(model)  # a shallow copy: the same modules and weights
    draft._modules = dict(model._modules)
    draft._modules["layers"] = torch.nn.ModuleList(list(model.layers)[:n])
    draft.config = dataclasses.replace(model.config, num_layers=n)
    return draft


def speculative_loop(model, ids: list[int], max_new_tokens: int, config: SamplingConfig, stops: set[int],
                     generator: torch.Generator | None, cache: Cache, proposer: Proposer) -> Iterator[int]:
    """Yield new tokens; each target pass verifies a draft and yields the kept tokens and one more."""
    if max_new_tokens == 0:
        return
    proposer.max_k = MAX_K
    proposer.fit_rollback(cache, "the target's")
    proposer.start(model, ids)
    stats = proposer.stats
    with torch.inference_mode():
        logits = model(torch.tensor([ids[len(cache):]]), cache=cache, logits_index=slice(-1, None))
        new = [int(sample(logits, config, generator)[0])]
    emitted = 0
    while True:
        for token in new:
            yield token
            emitted += 1
            if token in stops or emitted == max_new_tokens:
                return
        ids.extend(new)
        limit = min(max_new_tokens - emitted - 1, model.config.max_positions - len(ids), proposer.max_k)
        with torch.inference_mode():
            draft, q = proposer.propose(ids, limit, config, generator)
            logits = model(torch.tensor([[ids[-1], *draft]]), cache=cache, logits_index=slice(None))
            kept, extra = verify(logits, draft, q, config, generator)
            cache.crop(len(ids) + kept)  # the last token and the kept drafts stay; rejected positions go
            proposer.rollback(len(ids) + kept)
        proposer.update(len(draft), kept)
        stats.passes += 1
        stats.drafted += len(draft)
        stats.accepted += kept
        new = draft[:kept] + [extra]
        stats.emitted += len(new)


def verify(logits: torch.Tensor, draft: list[int], q: torch.Tensor | None, config: SamplingConfig,
            generator: torch.Generator | None) -> tuple[int, int]:
    """How many draft tokens are kept, and the token after them (logits: one row per draft token, plus one)."""
    if config.greedy:
        targets = logits.argmax(dim=-1).tolist()
        kept = 0
        while kept < len(draft) and draft[kept] == targets[kept]:
            kept += 1
        return kept, targets[kept]
    p = probs(logits, config)
    for i, token in enumerate(draft):
        q_token = 1.0 if q is None else float(q[i, token])
        if torch.rand((), generator=generator, dtype=torch.float64) * q_token < p[i, token]:
            continue  # kept with probability min(1, p/q)
        residual = p[i].clone()
        if q is None:
            residual[token] = 0.0
        else:
            residual = torch.clamp(residual - q[i], min=0.0)
        if float(residual.sum()) <= 0.0:  # p == q here: any draw from p is the right one
            residual = p[i]
        return i, _draw(residual / residual.sum(), generator)
    return len(draft), _draw(p[len(draft)], generator)


def _draw(dist: torch.Tensor, generator: torch.Generator | None) -> int:
    return int(torch.multinomial(dist, 1, generator=generator))
