"""One forward pass over the paged pool: a batch of sequences' new tokens, flattened, to their logits.

Shared by the engine's step (llm.py) and paged beam search (beam.py), so there is one way to build a batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..caches.paged import BatchEntry


def forward_batch(model, cache, batch: Sequence[tuple[Sequence[int], BatchEntry]]) -> torch.Tensor:
    """``batch``: per sequence its new tokens (the last ``entry.query_len`` of its context) and its entry.
    Returns logits of each sequence's last ``1 + entry.draft`` positions, in batch order."""
    ids, positions, entries, rows = [], [], [], []
    for tokens, entry in batch:
        ids.extend(tokens)
        positions.extend(range(entry.context_len - entry.query_len, entry.context_len))
        entries.append(entry)
        rows.extend(range(len(ids) - 1 - entry.draft, len(ids)))
    cache.prepare(entries)
    return model(torch.tensor([ids]), torch.tensor([positions]), cache=cache, logits_index=torch.tensor(rows))
