"""Perplexity over one long stream through a bounded cache, and the baseline it should match.

``evaluate.py`` cuts a corpus into windows of the model's context; a bounded cache (``window``, with or
without attention sinks) is instead measured the way it is used: one stream of ``max_tokens`` tokens fed
through it ``chunk`` tokens per forward, every token predicted from everything the cache kept, even past
the model's trained context.  The reference for such a cache is the sliding window *with recompute*:
token ``t`` predicted by re-encoding the ``window`` tokens before it from scratch (exact, and quadratic,
so it is evaluated every ``stride`` tokens).  Results are per-token losses, so curves can be drawn.

The default ``mixed`` corpus concatenates documents of the two shipped corpora, English and code, alternating.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .caches.registry import make_cache, parse_spec
from .eval import corpus_text


@dataclass
class StreamResult:
    label: str
    positions: list[int]  # token positions predicted (each from all before it)
    nll: list[float]  # nats, one per position
    kv_bytes: int = 0  # the cache's memory at the end of the stream
    curve: list[tuple[int, float]] = field(default_factory=list)  # (bucket end, perplexity)

    @property
    def perplexity(self) -> float:
        return math.exp(sum(self.nll) / len(self.nll))

    def at(self, positions: list[int]) -> "StreamResult":
        """The same result restricted to ``positions`` (to compare with a strided baseline)."""
        index = {p: i for i, p in enumerate(self.positions)}
        return StreamResult(self.label, positions, [self.nll[index[p]] for p in positions], self.kv_bytes)


def stream_ids(model, max_tokens: int, corpus: str = "mixed", text: str | None = None) -> list[int]:
    """The first ``max_tokens`` tokens of ``text`` or of a shipped corpus (``mixed``: English and code)."""
    ids = model.tokenizer.encode(text if text is not None else corpus_text(corpus))
    if len(ids) < max_tokens:
        raise ValueError(f"the stream has {len(ids):,} tokens, fewer than max_tokens={max_tokens:,}")
    return ids[:max_tokens]


def evaluate_stream(model, spec: str, ids: list[int], chunk: int = 256, label: str | None = None) -> StreamResult:
    """Every position 1..N-1 predicted through one cache built from ``spec``, fed ``chunk`` tokens at a time."""
    parse_spec(spec)
    cache = make_cache(spec, model, batch=1, capacity=len(ids))
    tokens = torch.tensor(ids)
    nll = []
    with torch.inference_mode():
        for start in range(0, len(ids) - 1, chunk):
            piece = tokens[start:min(start + chunk, len(ids) - 1)]
            logits = model(piece[None], cache=cache).float()[0]
            targets = tokens[start + 1:start + 1 + len(piece)]
            nll += (-F.log_softmax(logits, -1).gather(1, targets[:, None])[:, 0]).tolist()
    return StreamResult(label or spec, list(range(1, len(ids))), nll, cache.nbytes)


def recompute_baseline(model, ids: list[int], window: int, stride: int = 64, batch: int = 8) -> StreamResult:
    """Sliding window with recompute: position ``t`` predicted from the ``window`` tokens before it, re-encoded
    from scratch (no cache), every ``stride`` positions from ``window`` on."""
    positions = list(range(window, len(ids), stride))
    tokens = torch.tensor(ids)
    nll = []
    with torch.inference_mode():
        for i in range(0, len(positions), batch):
            group = positions[i:i + batch]
            inputs = torch.stack([tokens[t - window:t] for t in group])
            logits = model(inputs, logits_index=slice(window - 1, None, window)).float()  # each row's last
            nll += (-F.log_softmax(logits, -1).gather(1, tokens[group][:, None])[:, 0]).tolist()
    return StreamResult(f"recompute:window={window}", positions, nll)


def with_curve(result: StreamResult, bucket: int) -> StreamResult:
    """Perplexity per ``bucket`` tokens of the stream (over the positions the result has)."""
    sums: dict[int, list[float]] = {}
    for p, x in zip(result.positions, result.nll):
        sums.setdefault(p // bucket, []).append(x)
    result.curve = [((b + 1) * bucket, math.exp(sum(v) / len(v))) for b, v in sorted(sums.items())]
    return result
