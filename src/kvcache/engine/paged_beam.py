"""Beam search on the engine's paged KV memory: beams share blocks instead of copying caches.

The reference (``kvcache.generation.beam.beam_search``) reorders a contiguous
cache with ``select`` every step, copying every beam's whole KV.  Here each
beam is a sequence of the engine's :class:`BlockManager`:

* the prompt is prefilled once into one sequence (prefix caching applies),
  which the first step forks into the W beams: every child shares every block;
* each step, a parent's first chosen child keeps the parent's sequence, further
  children ``fork`` it, and parents nobody continues are freed (after the
  forks).  Appending a token to a shared, partially filled last block makes
  the block manager copy it (copy-on-write): those ``CopyOp``s run before the
  forward pass, so a step copies at most one block per beam, never a history;
* all running beams decode in ONE flattened forward pass over the pool.

The selection is the reference's :class:`~kvcache.generation.beam.BeamSearch`,
so both drivers agree token for token (scores up to float rounding).

Memory: before touching the block manager, each step computes exactly how many
blocks it needs.  If the pool cannot provide them, the beam group is preempted
as a whole (every beam's blocks freed; their full blocks stay in the prefix
cache) and resumed by recompute: the engine's other in-flight requests are
stepped until the group fits, then every beam is prefilled again in one pass
(mostly prefix-cache hits) and the search continues with the same logits, so
the result equals a run with ample memory.  :class:`OutOfBlocks` is raised only
when the group can never fit: nothing else is running and it still does not.
Every sequence of the group is freed when the call returns or raises, and blocks
reserved for a pass that never ran leave the prefix cache, so no block leaks and
no later hit returns unwritten KV.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch

from ..caches.paged import BatchEntry
from ..generation.beam import BeamHypothesis, start_search
from .block_manager import BlockManager, OutOfBlocks
from .model_runner import forward_batch

__all__ = ["paged_beam_search"]

# Engine sequences use ints from itertools.count(); beam sequences use
# ("beam", n) tuples from this private counter, so ids never collide.
_beam_ids = itertools.count()


def _new_id() -> tuple[str, int]:
    return ("beam", next(_beam_ids))


def _step_need(bm: BlockManager, seq_ids: Sequence) -> int:
    """Blocks that appending one token to each of ``seq_ids`` (in order) takes from the pool.

    Mirrors ``append_slots``: a new block when the last one is full, or a
    copy-on-write of a partially filled last block that is still shared
    (the last sharer to append writes in place).
    """
    refs: dict[int, int] = {}
    need = 0
    for sid in seq_ids:
        n, last = bm.num_tokens(sid), bm.block_table(sid)[-1]
        if n % bm.block_size == 0:
            need += 1
        else:
            ref = refs.setdefault(last, bm.ref_count(last))
            if ref > 1:
                need += 1
                refs[last] = ref - 1
    return need


def _admit_need(bm: BlockManager, seqs: list[list[int]]) -> int:
    """Blocks that allocating ``seqs`` one after another takes from the pool at most: equal
    prefixes share their full blocks (the prefix cache), the block holding each last token is
    always new.  Exact when no other sequence holds any of them and hashes do not collide."""
    bs = bm.block_size
    shared = {tuple(s[:(i + 1) * bs]) for s in seqs for i in range((len(s) - 1) // bs)}
    return len(shared) + len(seqs)


class _BeamGroup:
    """The beams' sequences in the block manager, and how many of each one's tokens have KV."""

    def __init__(self, llm, beam_width: int):
        self.llm, self.bm, self.width = llm, llm.block_manager, beam_width
        self.live: list = []  # seq id of each running beam, in search.sequences order
        self.written: dict = {}  # every sequence the group holds -> tokens whose KV is written

    def admit(self, seqs: list[list[int]], when: str) -> torch.Tensor:
        """Prefill ``seqs`` as the live beams; their last positions' logits.  Steps the engine's
        other requests while the pool is too full; raises OutOfBlocks if it can never fit."""
        need = _admit_need(self.bm, seqs)
        while not (need <= self.bm.num_free_blocks() and self._allocate(seqs)):
            if need > self.bm.num_blocks or not self.llm.scheduler.has_work():
                raise self._out_of_blocks(need, when)
            self.llm._step_aside()
        return self._forward([(seq[self.written[sid]:], BatchEntry(len(seq) - self.written[sid], len(seq),
                                                                    self.bm.block_table(sid)))
                              for sid, seq in zip(self.live, seqs)])

    def _allocate(self, seqs: list[list[int]]) -> bool:
        """All or nothing (a hash collision can make ``_admit_need`` too low)."""
        for seq in seqs:
            if not self.bm.can_allocate(seq):
                self.release()
                return False
            sid = _new_id()
            self.written[sid] = self.bm.allocate(sid, seq)
            self.live.append(sid)
        return True

    def reorder(self, parents: list[int]) -> None:
        """Fork first (a parent's first child keeps its sequence), then free the unchosen parents."""
        chosen, live = set(), []
        for p in parents:
            if p in chosen:
                child = _new_id()
                self.bm.fork(self.live[p], child)
                self.written[child] = self.written[self.live[p]]
                live.append(child)
            else:
                chosen.add(p)
                live.append(self.live[p])
        for i, sid in enumerate(self.live):
            if i not in chosen:
                self.bm.free(sid)
                del self.written[sid]
        self.live = live

    def fits_step(self) -> bool:
        return _step_need(self.bm, self.live) <= self.bm.num_free_blocks()

    def decode(self, new_tokens: list[int]) -> torch.Tensor:
        """Append one token to every beam and run them in one pass; their logits."""
        ops, batch = [], []
        for sid, token in zip(self.live, new_tokens):
            ops += self.bm.append_slots(sid, [token])
            batch.append(([token], BatchEntry(1, self.bm.num_tokens(sid), self.bm.block_table(sid))))
        self.llm.cache.copy_blocks(ops)  # copy-on-write BEFORE the forward writes the new KV
        return self._forward(batch)

    def _forward(self, batch) -> torch.Tensor:
        logits = forward_batch(self.llm.model, self.llm.cache, batch)
        for sid in self.live:
            self.written[sid] = self.bm.num_tokens(sid)
        return logits

    def release(self) -> None:
        """Free every sequence; blocks reserved for a pass that never ran leave the prefix cache."""
        for sid, written in self.written.items():
            self.bm.free(sid, written)
        self.written.clear()
        self.live = []

    def _out_of_blocks(self, needed: int, when: str) -> OutOfBlocks:
        return OutOfBlocks(
            f"beam search (beam_width={self.width}) ran out of KV blocks {when}: the beam group needed "
            f"{needed} blocks of {self.bm.block_size} tokens but the pool has {self.bm.num_blocks} blocks in "
            f"total ({self.bm.num_free_blocks()} free) and no other request is running to free more; the group "
            f"was preempted and all its blocks freed. Give the engine more KV memory, or use a smaller "
            f"beam_width or max_new_tokens.")


def paged_beam_search(
    llm,
    prompt_ids: Sequence[int] | torch.Tensor,
    beam_width: int,
    max_new_tokens: int,
    length_penalty: float = 1.0,
    stop_token_ids: Sequence[int] | None = None,
) -> list[BeamHypothesis]:
    """Beam search over ``llm``'s paged KV cache; ``beam_width`` hypotheses, best first.

    Same arguments and results as :func:`kvcache.generation.beam.beam_search`.
    Short of memory, the group waits for the engine's other requests (stepping
    them); raises :class:`OutOfBlocks` (after freeing the group) only when it
    can never fit.
    """
    ids, search = start_search(llm.model, llm.tokenizer, prompt_ids, beam_width, max_new_tokens, length_penalty,
                               stop_token_ids)
    if search.done:
        return []
    group = _BeamGroup(llm, beam_width)
    try:
        with torch.inference_mode():
            logits = group.admit([ids], "prefilling the prompt")  # a cached prefix is reused, not recomputed
            while True:
                parents = search.advance(logits)
                if search.done:
                    break
                group.reorder(parents)
                if group.fits_step():
                    logits = group.decode([seq[-1] for seq in search.sequences])
                else:  # preempt the whole group (its KV is all written), resume by recompute
                    group.release()
                    logits = group.admit([ids + seq for seq in search.sequences], f"at new token {search.length}")
    finally:
        group.release()
    return search.results()
