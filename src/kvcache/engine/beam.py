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
blocks it needs.  If the pool cannot provide them the beam group is preempted
as a whole (all its sequences freed) and :class:`OutOfBlocks` is raised; there
is no concurrent work to wait for in this call.  Every sequence of the group is
freed when the call returns or raises, so no block leaks.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch

from ..caches.paged import BatchEntry
from ..generation.beam import BeamHypothesis, start_search
from .block_manager import BlockManager, OutOfBlocks

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


def _held(bm: BlockManager, seq_ids) -> int:
    return len(set().union(*(bm.block_table(s) for s in seq_ids))) if seq_ids else 0


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
    Raises :class:`OutOfBlocks` (after freeing the whole beam group) when the
    pool cannot hold the beams.
    """
    model, bm, cache = llm.model, llm.block_manager, llm.cache
    ids, search = start_search(model, llm.tokenizer, prompt_ids, beam_width, max_new_tokens, length_penalty, stop_token_ids)
    if search.done:
        return []

    owned: set = set()  # every live sequence of this beam group
    live: list = []  # seq id of each running beam, in search.sequences order
    unwritten = False  # blocks reserved (maybe registered in the prefix cache) but KV not yet written

    def preempt(needed: int, when: str) -> OutOfBlocks:
        free_now = bm.num_free_blocks()
        for sid in list(owned):
            bm.free(sid)
            owned.discard(sid)
        return OutOfBlocks(
            f"beam search (beam_width={beam_width}) ran out of KV blocks {when}: the beam group needed "
            f"{needed} blocks of {bm.block_size} tokens but the pool has {bm.num_blocks} blocks in total "
            f"({free_now} free besides the group's own); the group was preempted and all its blocks freed. "
            f"Give the engine more KV memory, or use a smaller beam_width or max_new_tokens.")

    try:
        with torch.inference_mode():
            # Prefill the prompt once (a cached prefix is reused, not recomputed).
            root = _new_id()
            if not bm.can_allocate(ids):
                hits = bm.cached_prefix_len(ids) // bm.block_size
                raise preempt(bm.blocks_for(len(ids)) - hits, "prefilling the prompt")
            unwritten = True
            cached = bm.allocate(root, ids)
            owned.add(root)
            live = [root]
            cache.prepare([BatchEntry(len(ids) - cached, len(ids), bm.block_table(root))])
            logits = model(torch.tensor([ids[cached:]]), torch.tensor([list(range(cached, len(ids)))]),
                           cache=cache, logits_index=slice(-1, None))
            unwritten = False

            while True:
                parents = search.advance(logits)
                if search.done:
                    break
                # Fork first (a parent's first child keeps its sequence), then free the unchosen parents.
                chosen, new_live = set(), []
                for p in parents:
                    if p in chosen:
                        child = _new_id()
                        bm.fork(live[p], child)
                        owned.add(child)
                        new_live.append(child)
                    else:
                        chosen.add(p)
                        new_live.append(live[p])
                for i, sid in enumerate(live):
                    if i not in chosen:
                        bm.free(sid)
                        owned.discard(sid)
                live = new_live

                need = _step_need(bm, live)
                if need > bm.num_free_blocks():
                    raise preempt(_held(bm, live) + need, f"at new token {search.length}")
                unwritten = True
                ops, tokens, positions, entries = [], [], [], []
                for sid, seq in zip(live, search.sequences):
                    ops += bm.append_slots(sid, [seq[-1]])
                    n = bm.num_tokens(sid)
                    tokens.append(seq[-1])
                    positions.append(n - 1)
                    entries.append(BatchEntry(1, n, bm.block_table(sid)))
                cache.copy_blocks(ops)  # copy-on-write BEFORE the forward writes the new KV
                cache.prepare(entries)
                logits = model(torch.tensor([tokens]), torch.tensor([positions]), cache=cache,
                               logits_index=torch.arange(len(live)))
                unwritten = False
    finally:
        for sid in owned:
            bm.free(sid)
        owned.clear()
        if unwritten:
            # Interrupted between reserving slots and writing their KV: blocks filled in
            # that step may be registered in the prefix cache without valid KV.  Drop
            # every unreferenced cached block so no later request can hit them.
            bm.reset_prefix_cache()
    return search.results()
