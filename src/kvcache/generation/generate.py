"""Autoregressive generation: one prefill pass over the prompt, then one token per step.

``use_cache=False`` is the naive baseline kept on purpose: every step re-runs
the whole prefix, so total cost grows quadratically with length.  The
cached path feeds only the newest token and reads earlier keys/values from
a ``ContiguousKVCache`` sized exactly for prompt + max_new_tokens.  A caller
may pass its own cache already holding the keys/values of a prefix of the
prompt (a chat that goes on, a shared preamble): only the rest is prefilled.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence

import torch

from ..caches.contiguous import ContiguousKVCache
from .sampling import SamplingConfig, sample
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
    cache: ContiguousKVCache | None = None,
) -> Iterator[int]:
    """Yield new token ids as they are produced.

    prompt_ids: a 1-D list/tuple/tensor/numpy array of integer token ids.
    stop_token_ids defaults to the model's EOS ids; pass ``[]`` to never stop
    early.  A stop token is yielded, then generation ends.  Every argument is
    checked here, at call time, not at the first ``next()``.
    cache: a batch-1 ``ContiguousKVCache`` holding the KV of ``prompt_ids[:len(cache)]``
    (the caller vouches for those tokens); the rest of the prompt and every
    generated token but the last are appended to it.  Default: a fresh cache.
    """
    ids = check_prompt(model, prompt_ids, max_new_tokens)
    max_new_tokens = int(max_new_tokens)
    if not isinstance(use_cache, bool):
        raise TypeError(f"use_cache must be a bool, got {use_cache!r}")
    if cache is not None:
        _check_cache(model, cache, ids, use_cache)
    config = SamplingConfig(temperature, top_k, top_p)
    stops = set(resolve_stop_ids(model.tokenizer, stop_token_ids, model.config.vocab_size))
    seed = check_seed(seed)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return _decode_loop(model, ids, max_new_tokens, use_cache, config, stops, generator, cache)


def _check_cache(model, cache, ids: list[int], use_cache: bool) -> None:
    if not use_cache:
        raise ValueError("a cache was passed with use_cache=False")
    if not isinstance(cache, ContiguousKVCache):
        raise TypeError(f"cache must be a ContiguousKVCache, got {type(cache).__name__}")
    c = model.config
    if (cache.batch, cache.num_layers, cache.num_kv_heads, cache.head_dim) != (1, c.num_layers, c.num_kv_heads,
                                                                               c.head_dim):
        raise ValueError(f"cache shape (batch {cache.batch}, {cache.num_layers} layers, {cache.num_kv_heads} KV "
                         f"heads, head_dim {cache.head_dim}) does not fit this model with batch 1")
    if len(cache) >= len(ids):
        raise ValueError(f"the cache holds {len(cache)} positions but the prompt has {len(ids)} tokens: at least "
                         "the last prompt token must be new (crop the cache first)")


def _decode_loop(model, ids: list[int], max_new_tokens: int, use_cache: bool, config: SamplingConfig,
                 stops: set[int], generator: torch.Generator | None,
                 cache: ContiguousKVCache | None = None) -> Iterator[int]:
    # inference mode is entered per step, never held across a yield: a paused or abandoned
    # stream must not leave the caller's code running in inference mode
    if max_new_tokens == 0:
        return
    with torch.inference_mode():
        if use_cache and cache is None:
            cache = ContiguousKVCache.for_model(model, capacity=len(ids) + max_new_tokens, check_finite=False)
        start = len(cache) if cache is not None else 0
        token = _next_token(model, torch.tensor([ids[start:]]), cache, config, generator)
    for step in range(max_new_tokens):
        yield token
        if token in stops or step == max_new_tokens - 1:
            return
        ids.append(token)
        with torch.inference_mode():
            token = _next_token(model, torch.tensor([[token]] if use_cache else [ids]), cache, config, generator)


def _next_token(model, input_ids: torch.Tensor, cache: ContiguousKVCache | None, config: SamplingConfig,
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
    cache: ContiguousKVCache | None = None,
) -> list[int]:
    """The new token ids (not the prompt).  ``callback(token)`` is called as each is produced."""
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable or None, got {type(callback).__name__}")
    out = []
    for token in stream(model, prompt_ids, max_new_tokens, use_cache=use_cache, temperature=temperature,
                        top_k=top_k, top_p=top_p, seed=seed, stop_token_ids=stop_token_ids, cache=cache):
        out.append(token)
        if callback is not None:
            callback(token)
    return out
