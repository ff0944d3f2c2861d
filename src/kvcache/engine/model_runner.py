"""The model side of a step: a batch's tokens flattened into one forward pass, then sampled.

``forward_batch`` is shared by the engine's step and paged beam search, so there is one way to build a
batch.  ``ModelRunner`` adds what the step does with the logits: sample a token, verify a speculative
draft, and fork the completions of a parallel-sampling request.
"""

from __future__ import annotations

from collections.abc import Sequence as SequenceABC

import torch

from ..caches.paged import BatchEntry
from ..generation.sampling import sample
from ..generation.speculative import verify
from .sequence import Sequence, Status


def forward_batch(model, cache, batch: SequenceABC[tuple[SequenceABC[int], BatchEntry]]) -> torch.Tensor:
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


class ModelRunner:
    def __init__(self, model, pool, block_manager, scheduler, tokenizer):
        self.model, self.pool, self.block_manager, self.scheduler = model, pool, block_manager, scheduler
        self.tokenizer = tokenizer
        self.drafted = self.accepted = 0  # speculative tokens proposed / kept, over all requests

    def forward(self, batch: list[tuple[Sequence, int]]) -> tuple[torch.Tensor, dict[int, list]]:
        """Logits of the scheduled tokens (each sequence's next ``n``: a decode token and its draft, or a
        prompt chunk), and each sequence's block table as the pass used it."""
        work, tables = [], {}
        for seq, n in batch:
            tokens = seq.tokens + seq.draft  # a speculating sequence verifies its draft in the same pass
            start = seq.num_computed
            tables[seq.seq_id] = table = self.block_manager.block_table(seq.seq_id)
            work.append((tokens[start:start + n], BatchEntry(n, start + n, table, len(seq.draft), self.pool.window)))
        return forward_batch(self.model, self.pool, work), tables

    def sample(self, row: torch.Tensor, seq: Sequence) -> int:
        return int(sample(row[None], seq.request.params.sampling, seq.generator)[0])

    def accept(self, seq: Sequence, logits: torch.Tensor, still_filling: set[int]) -> list[int]:
        """Verify ``seq``'s draft: the kept drafts and the token after them.  Rejected drafts leave the block
        manager (and with it the prefix cache); a block the rollback leaves partial is still being filled."""
        draft = seq.draft
        kept, extra = verify(logits, draft, None, seq.request.params.sampling, seq.generator)
        keep = len(seq.tokens) + kept
        self.block_manager.truncate(seq.seq_id, keep)
        seq.num_computed, seq.draft = keep, []
        if keep % self.block_manager.block_size:
            still_filling.add(self.block_manager.block_table(seq.seq_id)[-1])
        metrics = seq.request.metrics
        metrics.drafted_tokens += len(draft)
        metrics.accepted_tokens += kept
        self.drafted += len(draft)
        self.accepted += kept
        return draft[:kept] + [extra]

    def fork_children(self, parent: Sequence, row: torch.Tensor, emit) -> None:
        """Parallel sampling: children share the parent's prefilled blocks (copy-on-write); each draws its
        first token from the parent's last logits ``row``."""
        request, tokens = parent.request, list(parent.tokens)
        for index in range(1, request.params.n):
            child = Sequence(request, tokens, index, self.tokenizer)
            child.num_computed, child.status = len(tokens), Status.RUNNING
            self.block_manager.fork(parent.seq_id, child.seq_id)
            request.sequences.append(child)
            self.scheduler.running.append(child)
            token = int(row.argmax()) if request.params.sampling.greedy else self.sample(row, child)
            emit(child, token)
