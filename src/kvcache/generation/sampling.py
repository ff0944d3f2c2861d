"""Choosing the next token from logits: greedy, temperature, top-k, top-p.

Order follows common practice (and transformers): temperature, then top-k,
then top-p (nucleus) on what is left, then a draw from the renormalised
distribution.  Temperature 0 means greedy (argmax).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..checks import check_int, check_real


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self) -> None:
        """Check types (TypeError) then ranges (ValueError); store plain Python numbers."""
        temperature = check_real(self.temperature, "temperature")
        if temperature < 0.0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        object.__setattr__(self, "temperature", temperature)
        if self.top_k is not None:
            object.__setattr__(self, "top_k", check_int(self.top_k, "top_k", minimum=1))
        if self.top_p is not None:
            top_p = check_real(self.top_p, "top_p")
            if not 0.0 < top_p <= 1.0:
                raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
            object.__setattr__(self, "top_p", top_p)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def filter_logits(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Set to -inf every logit outside the top-k / top-p set (rows of a (batch, vocab) tensor)."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        drop_sorted = cum - torch.softmax(sorted_logits, dim=-1) >= top_p  # keep the token that crosses top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def probs(logits: torch.Tensor, config: SamplingConfig) -> torch.Tensor:
    """The distribution ``sample`` draws from (float64, rows of (batch, vocab)); one-hot argmax when greedy."""
    if config.greedy:
        return torch.nn.functional.one_hot(logits.argmax(dim=-1), logits.shape[-1]).double()
    # float64, and the maximum subtracted before dividing: any positive float temperature is a normal number
    # there (float32 would flush 1e-45 to 0 under flush-denormal), and the rest goes to -inf, never inf - inf
    logits = logits.double()
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / config.temperature
    logits = filter_logits(logits, config.top_k, config.top_p)
    return torch.softmax(logits, dim=-1)


def sample(logits: torch.Tensor, config: SamplingConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids (batch,) from logits (batch, vocab)."""
    if config.greedy:
        return logits.argmax(dim=-1)
    return torch.multinomial(probs(logits, config), 1, generator=generator).squeeze(-1)
