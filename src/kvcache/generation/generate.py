"""Autoregressive generation: one prefill pass over the prompt, then one token per step.

``use_cache=False`` is the naive baseline kept on purpose: every step re-runs
the whole prefix, so total cost grows quadratically with length.  The
cached path feeds only the newest token and reads earlier keys/values from
a cache sized exactly for prompt + max_new_tokens: the caller chooses which
(``cache="int8"``, any spec of ``caches/base.py``; default full precision).  A
caller may instead pass its own cache object already holding the keys/values
of a prefix of the prompt (a chat that goes on, a shared preamble): only the
rest is prefilled.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence

import torch

from ..caches.base import Cache
from ..caches.registry import make_cache
from .sampling import SamplingConfig, sample
from .speculative import Proposer, make_proposer, speculative_loop
from .validation import check_prompt, check_seed, resolve_stop_ids

__all__ = ["generate", "stream", "check_prompt"]


def stream(
    model,
    prompt_ids: Sequence[int] | torch.Tensor,
    max_new_tokens: int,
    *,
    use_cache: bool = True,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop_token_ids: Iterable[int] | None = None,
    cache: str | Cache | None = None,
    speculative: str | Proposer | None = None,
) -> Iterator[int]:
    """Yield new token ids as they are produced.

    prompt_ids: a 1-D list/tuple/tensor/numpy array of integer token ids.
    stop_token_ids defaults to the model's EOS ids; pass ``[]`` to never stop
    early.  A stop token is yielded, then generation ends.  Every argument is
    checked here, at call time, not at the first ``next()``.
    cache: a spec string (``"int8"``, ``"int4:group=32,residual=128"``; see
    ``kvcache caches``) for a fresh cache of that kind, or a batch-1 cache object
    holding the KV of ``prompt_ids[:len(cache)]`` (the caller vouches for those
    tokens); the rest of the prompt and every generated token but the last are
    appended to it.  Default: a fresh full-precision cache.
    speculative: a proposer spec (``"prompt-lookup"``, ``"draft:MODEL"``; see generation/speculative.py) or a
    ``Proposer``: each model pass verifies its draft; the output is the same as without it (greedy: token for
    token; sampling: in distribution).  The proposer's ``stats`` count drafts and acceptances.
    """
    ids = check_prompt(model, prompt_ids, max_new_tokens, bounded_positions=True)  # the limit: once the cache is known
    max_new_tokens = int(max_new_tokens)
    if not isinstance(use_cache, bool):
        raise TypeError(f"use_cache must be a bool, got {use_cache!r}")
    if isinstance(cache, str):
        if not use_cache:
            raise ValueError("a cache spec was passed with use_cache=False")
        cache = make_cache(cache, model, batch=1, capacity=len(ids) + max_new_tokens)
    elif cache is not None:
        _check_cache(model, cache, ids, use_cache)
    check_prompt(model, ids, max_new_tokens, bounded_positions=isinstance(cache, Cache) and cache.rotates_keys)
    config = SamplingConfig(temperature, top_k, top_p)
    stops = set(resolve_stop_ids(model.tokenizer, stop_token_ids, model.config.vocab_size))
    seed = check_seed(seed)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    if speculative is not None:
        if not use_cache:
            raise ValueError("speculative decoding verifies drafts over a cache: it needs use_cache=True")
        proposer = make_proposer(speculative)
        if cache is None:
            cache = make_cache(None, model, batch=1, capacity=len(ids) + max_new_tokens)
        return speculative_loop(model, ids, max_new_tokens, config, stops, generator, cache, proposer)
    return _decode_loop(model, ids, max_new_tokens, use_cache, config, stops, generator, cache)


def _check_cache(model, cache, ids: list[int], use_cache: bool) -> None:
    if not use_cache:
        raise ValueError("a cache was passed with use_cache=False")
    if not isinstance(cache, Cache):
        raise TypeError(f"cache must be a cache spec string or a kvcache.caches.base.Cache, got {type(cache).__name__}")
    cache.fits(model, batch=1)
    if len(cache) >= len(ids):
        raise ValueError(f"the cache holds {len(cache)} positions but the prompt has {len(ids)} tokens: at least "
                         "the last prompt token must be new (crop the cache first)")


def _decode_loop(model, ids: list[int], max_new_tokens: int, use_cache: bool, config: SamplingConfig,
                 stops: set[int], generator: torch.Generator | None,
                 cache: Cache | None = None) -> Iterator[int]:
    # inference mode is entered per step, never held across a yield: a paused or abandoned
    # stream must not leave the caller's code running in inference mode
    if max_new_tokens == 0:
        return
    with torch.inference_mode():
        if use_cache and cache is None:
            cache = make_cache(None, model, batch=1, capacity=len(ids) + max_new_tokens)
        start = len(cache) if cache is not None else 0
        token = _next_token(model, torch.tensor([ids[start:]]), cache, config, generator)
    for step in range(max_new_tokens):
        yield token
        if token in stops or step == max_new_tokens - 1:
            return
        ids.append(token)
        with torch.inference_mode():
            token = _next_token(model, torch.tensor([[token]] if use_cache else [ids]), cache, config, generator)


def _next_token(model, input_ids: torch.Tensor, cache: Cache | None, config: SamplingConfig,
                generator: torch.Generator | None) -> int:
    logits = model(input_ids, cache=cache, logits_index=slice(-1, None))
    return int(sample(logits, config, generator))


def generate(
    model,
    prompt_ids: Sequence[int] | torch.Tensor,
    max_new_tokens: int,
    *,
    use_cache: bool = True,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop_token_ids: Iterable[int] | None = None,
    callback: Callable[[int], None] | None = None,
    cache: str | Cache | None = None,
    speculative: str | Proposer | None = None,
) -> list[int]:
    """The new token ids (not the prompt).  ``callback(token)`` is called as each is produced."""
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable or None, got {type(callback).__name__}")
    out = []
    for token in stream(model, prompt_ids, max_new_tokens, use_cache=use_cache, temperature=temperature,
                        top_k=top_k, top_p=top_p, seed=seed, stop_token_ids=stop_token_ids, cache=cache,
                        speculative=speculative):
        out.append(token)
        if callback is not None:
            callback(token)
    return out
