"""Quality of a model and of a cache configuration: perplexity, bits per byte, KL divergence vs the exact cache.

Corpora need no download: ``code`` is the held-out validation split of the
running Python's standard library sources (the files the shipped model never
trained on, ``model/stdlib_corpus.py``), ``english`` is the English reference
documentation that ships with Python (``pydoc_data.topics``), ``mixed`` both,
alternating.  Bounded caches are measured over one long stream instead
(``eval_stream.py``).  Texts are joined
in a fixed order, tokenized once, and cut into non-overlapping windows of
``context`` tokens from the start, as many as ``max_tokens`` allows: the same
command gives the same windows on any machine with the same Python version.
In each window every token after the first is predicted from the ones before it.

The reference is the exact, uncached forward pass over each window.  Given a
cache (a spec such as ``"int4"``, or a factory), the same windows are fed
through the cache ``chunk`` tokens per forward, and the next-token
distributions are compared with the reference position by position: mean
KL(exact || cache) in nats and the share of positions whose top-1 token agrees.
Every token then attends to earlier ones through the cache's stored form as
decoding does: the quantized cache gives each query of a multi-token forward
exactly the view a token-by-token decode would have had (caches/quantized.py),
so ``chunk`` changes speed, not results (``chunk=1`` is literal decoding).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .caches.registry import make_cache, parse_spec

CORPORA = ("code", "english", "mixed")
CacheFactory = Callable[..., object]  # (model, batch=..., capacity=...) -> a cache with attend()


@dataclass
class EvalResult:
    corpus: str
    context: int
    windows: int
    tokens: int  # predicted tokens
    bytes: int  # UTF-8 bytes of the predicted tokens' text
    nll_per_token: float  # nats
    perplexity: float
    bits_per_byte: float
    kl_vs_exact: float | None = None  # mean over predicted positions, nats; only with a cache
    top1_agreement: float | None = None
    exact_perplexity: float | None = None  # the reference's, when a cache was evaluated
    cache: str | None = None  # the cache spec evaluated, when given as one

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


def corpus_text(name: str, piece_chars: int = 6000) -> str:
    """The text of a shipped corpus: ``code``, ``english``, or ``mixed`` (pieces of both, alternating: a stream
    of concatenated documents of two kinds)."""
    if name == "mixed":
        english, code = corpus_text("english"), corpus_text("code")
        pieces = []
        for i in range(0, max(len(english), len(code)), piece_chars):
            pieces += [english[i:i + piece_chars], code[i:i + piece_chars]]
        return "\n\n".join(p for p in pieces if p)
    if name == "code":
        from .model.stdlib_corpus import corpus_files, read_text

        _, validation, _ = corpus_files()
        return "\n\n".join(read_text(p) for p in validation)
    if name == "english":
        from pydoc_data.topics import topics

        return "\n\n".join(topics[key].strip() for key in sorted(topics))
    raise ValueError(f"unknown corpus {name!r}; choose one of {', '.join(CORPORA)} or pass a text file")


def windows(ids: list[int], context: int, max_tokens: int) -> list[list[int]]:
    """Non-overlapping ``context``-token windows from the start, within ``max_tokens`` tokens in all."""
    if context < 2:
        raise ValueError(f"context must be >= 2 tokens (one to read, one to predict), got {context}")
    if max_tokens < context:
        raise ValueError(f"max_tokens ({max_tokens}) must be at least the context ({context})")
    count = min(len(ids) // context, max_tokens // context)
    if count == 0:
        raise ValueError(f"the text is {len(ids)} tokens, shorter than one window of {context}")
    return [ids[i * context:(i + 1) * context] for i in range(count)]


def _log_probs_exact(model, window: torch.Tensor) -> torch.Tensor:
    """(T-1, vocab) log-probabilities of the uncached forward pass, for positions 0..T-2."""
    return F.log_softmax(model(window[None, :-1]).float()[0], dim=-1)


def _log_probs_cached(model, window: torch.Tensor, make_cache: CacheFactory, chunk: int) -> torch.Tensor:
    cache = make_cache(model, batch=1, capacity=len(window))
    parts = []
    for start in range(0, len(window) - 1, chunk):
        piece = window[start:min(start + chunk, len(window) - 1)]
        parts.append(model(piece[None], cache=cache).float()[0])
    return F.log_softmax(torch.cat(parts), dim=-1)


def evaluate(model, text: str | None = None, corpus: str = "code", context: int = 512, max_tokens: int = 8192,
             cache: str | CacheFactory | None = None, chunk: int = 64, progress: bool = False) -> EvalResult:
    """Perplexity of ``model`` on ``text`` (or a shipped corpus); with ``cache``, also KL/top-1 vs exact.

    cache: a cache spec string (``"int4:residual=0"``) or a factory ``(model, batch=, capacity=) -> cache``.
    """
    return evaluate_many(model, [cache], text, corpus, context, max_tokens, chunk, progress)[0]


def evaluate_many(model, caches: list[str | CacheFactory | None], text: str | None = None, corpus: str = "code",
                  context: int = 512, max_tokens: int = 8192, chunk: int = 64,
                  progress: bool = False) -> list[EvalResult]:
    """One result per cache (None: the exact model itself), sharing one exact pass per window."""
    from tqdm import tqdm

    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    factories = [_factory(cache) for cache in caches]  # bad specs fail before any work
    context = min(context, model.config.max_positions)
    name = "text" if text is not None else corpus
    ids = model.tokenizer.encode(text if text is not None else corpus_text(corpus))
    wins = windows(ids, context, max_tokens)
    nll, kl, agree = [0.0] * len(caches), [0.0] * len(caches), [0] * len(caches)
    nll_exact, tokens, nbytes = 0.0, 0, 0
    with torch.inference_mode():
        for win in tqdm(wins, desc=f"eval {name}", unit="window", disable=not progress, leave=False):
            window = torch.tensor(win)
            targets = window[1:]
            exact = _log_probs_exact(model, window)
            nll_exact += -exact.gather(1, targets[:, None]).sum().item()
            for i, factory in enumerate(factories):
                if factory is None:
                    continue
                got = _log_probs_cached(model, window, factory, chunk)
                nll[i] += -got.gather(1, targets[:, None]).sum().item()
                kl[i] += F.kl_div(got, exact, log_target=True, reduction="sum").item()
                agree[i] += int((got.argmax(-1) == exact.argmax(-1)).sum())
            tokens += len(targets)
            nbytes += len(model.tokenizer.decode(win[1:]).encode("utf-8"))
    results = []
    for i, (cache, factory) in enumerate(zip(caches, factories)):
        measured = nll[i] if factory is not None else nll_exact
        result = EvalResult(name, context, len(wins), tokens, nbytes, measured / tokens, math.exp(measured / tokens),
                            measured / math.log(2) / max(nbytes, 1))
        if factory is not None:
            result.kl_vs_exact, result.top1_agreement = kl[i] / tokens, agree[i] / tokens
            result.exact_perplexity = math.exp(nll_exact / tokens)
            result.cache = cache if isinstance(cache, str) else None
        results.append(result)
    return results


def _factory(cache: str | CacheFactory | None) -> CacheFactory | None:
    if not isinstance(cache, str):
        return cache
    parse_spec(cache)

    def build(model, batch, capacity):
        return make_cache(cache, model, batch=batch, capacity=capacity)

    return build


def read_text_file(path: str | Path) -> str:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"text file not found: {path}")
    return path.read_text(encoding="utf-8", errors="replace")
