"""Autoregressive generation: one prefill pass over the prompt, then one token per step.

``use_cache=False`` is the naive baseline kept on purpose: every step re-runs
the whole prefix, so total cost grows quadratically with length.  The
cached path feeds only the newest token and reads earlier keys/values from
a ``ContiguousKVCache`` sized exactly for prompt + max_new_tokens.
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
) -> Iterator[int]:
    """Yield new token ids as they are produced.

    prompt_ids: a 1-D list/tuple/tensor/numpy array of integer token ids.
    stop_token_ids defaults to the model's EOS ids; pass ``[]`` to never stop
    early.  A stop token is yielded, then generation ends.  Every argument is
    checked here, at call time, not at the first ``next()``.
    """
    ids = check_prompt(model, prompt_ids, max_new_tokens)
    max_new_tokens = int(max_new_tokens)
    if not isinstance(use_cache, bool):
        raise TypeError(f"use_cache must be a bool, got {use_cache!r}")
    config = SamplingConfig(temperature, top_k, top_p)
    stops = set(resolve_stop_ids(model.tokenizer, stop_token_ids, model.config.vocab_size))
    seed = check_seed(seed)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return _decode_loop(model, ids, max_new_tokens, use_cache, config, stops, generator)


def _decode_loop(model, ids: list[int], max_new_tokens: int, use_cache: bool, config: SamplingConfig,
                 stops: set[int], generator: torch.Generator | None) -> Iterator[int]:
    # inference mode is entered per step, never held across a yield: a paused or abandoned
    # stream must not leave the caller's code running in inference mode
    if max_new_tokens == 0:
        return
    cache = None
    with torch.inference_mode():
        if use_cache:
            cache = ContiguousKVCache.for_model(model, capacity=len(ids) + max_new_tokens, check_finite=False)
        token = _next_token(model, torch.tensor([ids]), cache, config, generator)
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
) -> list[int]:
    """The new token ids (not the prompt).  ``callback(token)`` is called as each is produced."""
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable or None, got {type(callback).__name__}")
    out = []
    for token in stream(model, prompt_ids, max_new_tokens, use_cache=use_cache, temperature=temperature,
                        top_k=top_k, top_p=top_p, seed=seed, stop_token_ids=stop_token_ids):
        out.append(token)
        if callback is not None:
            callback(token)
    return out
