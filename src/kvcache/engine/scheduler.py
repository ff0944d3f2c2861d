"""Continuous batching: which sequences run in the next forward pass.

Two queues.  Every step, each running sequence decodes one token (they all
share one batched forward, so the weights are read once for all of them);
prompts still being prefilled take the next chunk of their tokens that the
token budget leaves (chunked prefill: a prompt longer than the whole budget
never stalls the decodes, and a sliding-window sequence never holds more
than its window and a chunk); then waiting prompts are admitted while KV
blocks and the budget allow, their prefill mixed into the same forward.  A
prompt that fits the whole budget but not what is left of it waits for the
next step rather than being split: a chunk over cached context needs masked
attention, several times slower than one causal chunk.  When a running sequence
needs a block and none is left, the most recently admitted sequence is
preempted by recompute: its blocks are freed and it goes back to the front
of the waiting queue with every token it has produced, to be prefilled again
later (cheaply, when its blocks are still in the prefix cache).  Nothing it
produced is lost or produced twice.  ``max_num_seqs`` also counts the n - 1
children a parallel-sampling request forks after its prefill.
"""

from __future__ import annotations

from collections import deque

from .block_manager import BlockManager, CopyOp
from .sequence import Sequence, Status


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_batch_tokens: int = 2048, max_num_seqs: int = 256,
                 max_positions: int | None = None, tiers=None):
        self.bm = block_manager
        self.tiers = tiers  # a TierLink (engine/tiering.py) or None: where a pool miss may still find KV
        self.max_positions = max_positions
        self.max_batch_tokens, self.max_num_seqs = max_batch_tokens, max_num_seqs
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.preemptions = 0
        self.recomputed_tokens = 0
        self.prefill_tokens = 0  # prompt tokens actually computed (not served from the prefix cache)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> tuple[list[tuple[Sequence, int]], list[CopyOp], list[Sequence]]:
        """(sequences with their new-token counts, copy-on-write ops, sequences that can never fit)."""
        batch: list[tuple[Sequence, int]] = []
        copies: list[CopyOp] = []
        drafted = 0  # speculative tokens in the batch; every running sequence keeps one token of the budget
        for i, seq in enumerate(list(self.running)):
            if seq.status is not Status.RUNNING or _pending(seq) > 1:
                continue  # preempted below while making room for an earlier sequence; or still prefilling
            while seq.status is Status.RUNNING and not self.bm.can_append(seq.seq_id, 1):
                self.preempt(self.running[-1])
            if seq.status is Status.RUNNING:
                later = len(self.running) - 1 - i  # preemption only removes from the end: seq is still at i
                seq.draft = self._draft(seq, self.max_batch_tokens - len(self.running) - drafted, later)
                drafted += len(seq.draft)
                copies += self.bm.append_slots(seq.seq_id, [seq.tokens[-1], *seq.draft])
                batch.append((seq, 1 + len(seq.draft)))
        budget = self.max_batch_tokens - len(batch) - drafted
        for seq in list(self.running):  # prompts part-way through their prefill: the next chunk
            if budget <= 0:
                break
            if seq.status is not Status.RUNNING or _pending(seq) <= 1:
                continue
            chunk = seq.tokens[seq.num_computed:seq.num_computed + min(_pending(seq), budget)]
            scheduled = {id(s) for s, _ in batch}
            while seq.status is Status.RUNNING and not self.bm.can_append(seq.seq_id, len(chunk)):
                victim = next((s for s in reversed(self.running) if id(s) not in scheduled), None)
                if victim is None:
                    break  # only sequences of this batch hold blocks: the chunk waits for the next step
                self.preempt(victim)
            if seq.status is Status.RUNNING and self.bm.can_append(seq.seq_id, len(chunk)):
                copies += self.bm.append_slots(seq.seq_id, chunk)
                batch.append((seq, len(chunk)))
                budget -= len(chunk)
        rejected: list[Sequence] = []
        seats = sum(map(self._width, self.running))
        while self.waiting and seats + self._width(self.waiting[0]) <= self.max_num_seqs:
            seq = self.waiting[0]
            if budget <= 0:
                break
            cached = self.bm.cached_prefix_len(seq.tokens, seq.request.cache_salt)
            hit = self.tiers.probe(seq, cached) if self.tiers is not None else cached  # pool + tiers
            compute = len(seq.tokens) - hit
            if batch and budget < compute <= self.max_batch_tokens:
                break  # it fits whole in a later step: one chunk attends fastest (no masked context)
            first = seq.tokens[:hit + min(compute, budget)]  # the first chunk
            if not self.bm.can_allocate(first, seq.request.cache_salt):
                if not batch and not self.running:  # the whole pool is ours and still too small
                    rejected.append(self.waiting.popleft())
                    continue
                break
            fetched = self.tiers.fetch(seq, cached) if hit > cached else None
            if hit > cached and (fetched is None or fetched.tokens < hit):  # a chunk did not verify: compute more
                hit = fetched.tokens if fetched is not None else cached
                first = seq.tokens[:hit + min(len(seq.tokens) - hit, budget)]
                if not self.bm.can_allocate(first, seq.request.cache_salt):
                    break
            self.waiting.popleft()
            seats += self._width(seq)
            cached = self.bm.allocate(seq.seq_id, first, seq.request.cache_salt)
            if fetched is not None:
                cached = self.tiers.write(seq, cached, fetched)
            if seq.num_computed:  # readmitted after preemption: count the work redone
                self.recomputed_tokens += len(seq.tokens) - cached
            if seq.num_output == 0 and seq.index == 0:
                seq.request.metrics.cached_prompt_tokens = cached
            self.prefill_tokens += len(seq.tokens) - cached
            seq.num_computed = cached
            seq.status = Status.RUNNING
            self.running.append(seq)
            batch.append((seq, len(first) - cached))
            budget -= len(first) - cached
        return batch, copies, rejected

    def _draft(self, seq: Sequence, room: int, later: int) -> list[int]:
        """Speculative tokens to verify with ``seq``'s next token: what fits in the batch, the request and the
        free blocks left after one block for each of the ``later`` running sequences (a draft never causes a
        preemption)."""
        if seq.proposer is None:
            return []
        params = seq.request.params
        limit = min(room, params.max_new_tokens - seq.num_output - 1)
        if self.max_positions is not None:
            limit = min(limit, self.max_positions - len(seq.tokens))
        draft, _ = seq.proposer.propose(seq.tokens, limit, params.sampling, None)
        spare = self.bm.num_free_blocks() - later
        while draft and self.bm.blocks_needed(seq.seq_id, 1 + len(draft)) > spare:
            draft = draft[:-1]
        return draft

    @staticmethod
    def _width(seq: Sequence) -> int:
        """Seats ``seq`` takes under ``max_num_seqs``: a first sequence not yet forked also
        holds them for its n - 1 parallel-sampling children, forked right after its prefill."""
        request = seq.request
        return 1 + (request.params.n - len(request.sequences) if seq.index == 0 else 0)

    def preempt(self, seq: Sequence) -> None:
        """Back to the front of the queue.  Blocks past ``num_computed`` (reserved for a pass
        that never ran) leave the prefix cache."""
        self.bm.free(seq.seq_id, seq.num_computed)
        seq.draft = []
        self.running.remove(seq)
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.preemptions += 1

    def finish(self, seq: Sequence, reason: str) -> None:
        seq.status, seq.finish_reason = Status.FINISHED, reason
        self.bm.free(seq.seq_id)
        self.running.remove(seq)

    def abort(self, seq: Sequence) -> None:
        """Drop ``seq`` wherever it is; a running one frees its blocks."""
        if seq.status is Status.RUNNING:
            self.bm.free(seq.seq_id, seq.num_computed)
            self.running.remove(seq)
        elif seq.status is Status.WAITING:
            self.waiting.remove(seq)
        seq.status = Status.FINISHED
        seq.finish_reason = seq.finish_reason or "abort"


def _pending(seq: Sequence) -> int:
    """Tokens of ``seq`` without KV yet: 1 for a decoding sequence (its newest token), more mid-prefill."""
    return len(seq.tokens) - seq.num_computed
