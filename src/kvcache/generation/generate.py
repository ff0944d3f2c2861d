"""Autoregressive generation: one prefill pass over the prompt, then one token per step.

``use_cache=False`` is the naive baseline kept on purpose: every step re-runs
the whole prefix, so total cost grows quadratically with length.  The
cached path feeds only the newest token and reads earlier keys/values from
a ``ContiguousKVCache`` sized exactly for prompt + max_new_tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch

from ..caches.contiguous import ContiguousKVCache
from .sampling import SamplingConfig, sample


def check_prompt(model, prompt_ids, max_new_tokens: int) -> list[int]:
    """Validate a prompt against the model; returns it as a list of ints."""
    if isinstance(prompt_ids, torch.Tensor):
        if prompt_ids.dim() != 1:
            raise ValueError(f"prompt_ids must be 1-D, got shape {tuple(prompt_ids.shape)}")
        prompt_ids = prompt_ids.tolist()
    if isinstance(prompt_ids, (str, bytes)):
        raise TypeError("prompt_ids must be token ids; encode text with model.tokenizer.encode first")
    ids = list(prompt_ids)
    if not ids:
        raise ValueError("empty prompt: generation needs at least one prompt token")
    vocab = model.config.vocab_size
    for i in ids:
        if not isinstance(i, int) or isinstance(i, bool):
            raise TypeError(f"token ids must be integers, got {i!r}")
        if not 0 <= i < vocab:
            raise ValueError(f"token id {i} is outside the vocabulary [0, {vocab})")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
    limit = model.config.max_positions
    if len(ids) + max_new_tokens > limit:
        raise ValueError(f"prompt ({len(ids)} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
                         f"the model's maximum of {limit} positions")
    return ids


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
    stop_token_ids: Sequence[int] | None = None,
) -> Iterator[int]:
    """Yield new token ids as they are produced.

    stop_token_ids defaults to the model's EOS ids; pass ``[]`` to never stop
    early.  A stop token is yielded, then generation ends.
    """
    ids = check_prompt(model, prompt_ids, max_new_tokens)  # validate now, not at the first next()
    config = SamplingConfig(temperature, top_k, top_p)
    stops = set(model.tokenizer.eos_token_ids if stop_token_ids is None and model.tokenizer else stop_token_ids or [])
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return _decode_loop(model, ids, max_new_tokens, use_cache, config, stops, generator)


def _decode_loop(model, ids: list[int], max_new_tokens: int, use_cache: bool, config: SamplingConfig,
                 stops: set[int], generator: torch.Generator | None) -> Iterator[int]:
    if max_new_tokens == 0:
        return
    with torch.inference_mode():
        if use_cache:
            cache = ContiguousKVCache.for_model(model, capacity=len(ids) + max_new_tokens, check_finite=False)
            logits = model(torch.tensor([ids]), cache=cache, logits_index=slice(-1, None))
        else:
            logits = model(torch.tensor([ids]), logits_index=slice(-1, None))
        for step in range(max_new_tokens):
            token = int(sample(logits, config, generator))
            yield token
            if token in stops or step == max_new_tokens - 1:
                return
            ids.append(token)
            if use_cache:
                logits = model(torch.tensor([[token]]), cache=cache, logits_index=slice(-1, None))
            else:
                logits = model(torch.tensor([ids]), logits_index=slice(-1, None))


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
    stop_token_ids: Sequence[int] | None = None,
    callback: Callable[[int], None] | None = None,
) -> list[int]:
    """The new token ids (not the prompt).  ``callback(token)`` is called as each is produced."""
    out = []
    for token in stream(model, prompt_ids, max_new_tokens, use_cache=use_cache, temperature=temperature,
                        top_k=top_k, top_p=top_p, seed=seed, stop_token_ids=stop_token_ids):
        out.append(token)
        if callback is not None:
            callback(token)
    return out
