"""Checks for a generation request, run before any work so a bad call fails at once, by name.

Token ids arrive as lists, tuples, torch tensors or numpy arrays, and their
elements as Python or numpy integers: all are accepted and normalised to a
list of Python ints.  Bools and floats are not token ids.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from ..checks import check_int, is_int


def token_id_list(ids: Any, name: str) -> list[int]:
    """``ids`` (a 1-D sequence/tensor/array of integers) as a list of Python ints, types checked only."""
    if isinstance(ids, (torch.Tensor, np.ndarray)):
        if ids.ndim != 1:
            raise ValueError(f"{name} must be 1-D, got shape {tuple(ids.shape)}")
        ids = ids.tolist()  # bool/float dtypes come out as bools/floats and are refused below
    elif isinstance(ids, (str, bytes)):
        raise TypeError(f"{name} must be token ids, not text; encode text with model.tokenizer.encode first")
    elif not isinstance(ids, Iterable):
        raise TypeError(f"{name} must be a sequence of token ids, got {type(ids).__name__}")
    out = list(ids)
    for i in out:
        if not is_int(i):
            raise TypeError(f"{name}: token ids must be integers, got {i!r} ({type(i).__name__})")
    return [int(i) for i in out]


def check_vocab(ids: list[int], vocab: int, what: str = "token id") -> None:
    for i in ids:
        if not 0 <= i < vocab:
            raise ValueError(f"{what} {i} is outside the vocabulary [0, {vocab})")


def check_prompt(model, prompt_ids, max_new_tokens: int, bounded_positions: bool = False) -> list[int]:
    """Validate a prompt and ``max_new_tokens`` against the model; returns the prompt as a list of ints.
    ``bounded_positions``: the cache applies its own positions (a window cache with positions=cache), so the
    request may run past the model's context."""
    ids = token_id_list(prompt_ids, "prompt_ids")
    if not ids:
        raise ValueError("empty prompt: generation needs at least one prompt token")
    check_vocab(ids, model.config.vocab_size)
    max_new_tokens = check_int(max_new_tokens, "max_new_tokens", minimum=0)
    limit = model.config.max_positions
    if len(ids) + max_new_tokens > limit and not bounded_positions:
        from ..caches.window import default_size

        hint = (f"; single-stream generate streams past it with a window cache that applies its own positions "
                f"(cache='window:size={default_size(model.config)},sinks=4')"
                if getattr(model, "rope_cos", None) is not None and model.config.mla is None else "")
        raise ValueError(f"prompt ({len(ids)} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
                         f"the model's maximum of {limit} positions{hint}")
    return ids


def resolve_stop_ids(tokenizer, stop_token_ids: Iterable[int] | None, vocab_size: int) -> list[int]:
    """``None`` -> the tokenizer's EOS ids; ``[]`` -> no stop token.  Validated and deduplicated."""
    if stop_token_ids is None:
        ids = list(tokenizer.eos_token_ids) if tokenizer is not None else []
    else:
        ids = token_id_list(stop_token_ids, "stop_token_ids")
        check_vocab(ids, vocab_size, "stop token id")
    return list(dict.fromkeys(ids))


def check_seed(seed: Any) -> int | None:
    """None, or an integer torch.Generator.manual_seed accepts."""
    if seed is None:
        return None
    seed = check_int(seed, "seed")
    if not -(2**63) <= seed < 2**64:
        raise ValueError(f"seed must fit in 64 bits, got {seed}")
    return seed


def derived_seed(seed: int, index: int) -> int:
    """The seed of completion ``index`` of a request seeded ``seed``: ``seed + index`` in torch's seed space
    (integers mod 2**64, where torch puts negative seeds too), so every accepted seed has valid children."""
    return (seed + index) % 2**64
