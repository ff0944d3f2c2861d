"""The engine's side of the KV tiers (kvcache/tiers): load a waiting prompt's prefix, save completed chunks.

At admission the scheduler asks ``probe`` how many prompt tokens the pool and the tiers together can supply;
``fetch`` then reads and verifies the chunks past the pool's own hit, and after the block manager allocated
the sequence, ``write`` copies them into its blocks -- before the step's forward pass, so those tokens are
never computed.  Like a pool hit, at least the last prompt token is always computed (its logits are needed).
After each step ``save`` copies every chunk that step completed out of the pool and queues it for the
background writer.  A chunk is a whole number of blocks, so every copy moves whole blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..tiers import KVTiers
from ..tiers.keys import next_key
from .sequence import Sequence


@dataclass
class Fetched:
    first: int          # index of the first chunk fetched
    chunks: list[dict]  # each chunk's tensors, as the pool stores them
    sources: list       # the store each chunk came from
    tokens: int         # prompt tokens the sequence has cached once they are written (pool hit included)


class TierLink:
    def __init__(self, tiers: KVTiers, block_manager, pool):
        self.tiers, self.bm, self.pool = tiers, block_manager, pool
        self.chunk, self.block = tiers.chunk_tokens, block_manager.block_size
        self.loaded_tokens = 0  # prompt tokens written from the tiers, over all sequences
        self.queued_chunks = 0

    def _limit(self, seq: Sequence) -> int:
        return (len(seq.tokens) - 1) // self.block * self.block  # the last token is always computed

    def probe(self, seq: Sequence, cached: int) -> int:
        """Tokens the pool (``cached``) and the tiers together can supply; the store is asked once per length."""
        limit = self._limit(seq)
        if limit <= cached:
            return cached
        first = cached // self.chunk
        if seq.tier_probe is None or seq.tier_probe[:2] != (len(seq.tokens), first):
            keys = self.tiers.keys(seq.tokens, seq.request.cache_salt, -(-limit // self.chunk))[first:]
            seq.tier_probe = (len(seq.tokens), first, keys, self.tiers.probe(keys))
        return max(cached, min((first + seq.tier_probe[3]) * self.chunk, limit))

    def fetch(self, seq: Sequence, cached: int) -> Fetched | None:
        """The probed chunks, verified; None when they add nothing to the pool's hit."""
        if self.probe(seq, cached) <= cached:
            return None
        _, first, keys, present = seq.tier_probe
        seq.tier_probe = None  # a chunk that fails to verify is deleted: the next probe sees it gone
        chunks, sources = self.tiers.fetch(keys[:present], seq.tokens[first * self.chunk:])
        tokens = min((first + len(chunks)) * self.chunk, self._limit(seq))
        return Fetched(first, chunks, sources, tokens) if tokens > cached else None

    def write(self, seq: Sequence, cached: int, fetched: Fetched) -> int:
        """Copy the fetched chunks' blocks past the pool's hit into the sequence's blocks; the tokens cached now."""
        table, bpc = self.bm.block_table(seq.seq_id), self.chunk // self.block
        tensors = self.pool.block_tensors()
        for j, data in enumerate(fetched.chunks):
            lo = max((fetched.first + j) * bpc, cached // self.block)
            hi = min((fetched.first + j + 1) * bpc, fetched.tokens // self.block)
            if hi <= lo:
                continue
            for name, (pool_tensor, axis, unit) in tensors.items():
                index = _block_index(table[lo:hi], unit)
                src = data[name].narrow(axis, (lo - (fetched.first + j) * bpc) * unit, (hi - lo) * unit)
                pool_tensor.index_copy_(axis, index, src)
        self.tiers.credit(fetched.sources, fetched.tokens - cached)
        self.loaded_tokens += fetched.tokens - cached
        return fetched.tokens

    def save(self, batch, tables: dict) -> None:
        """Queue every chunk the step completed (prompt or output) that the tiers do not hold yet."""
        bpc, tensors = self.chunk // self.block, None
        for seq, _ in batch:
            done = seq.num_computed // self.chunk
            while seq.tier_chunks < done:
                i = seq.tier_chunks
                tokens = seq.tokens[i * self.chunk:(i + 1) * self.chunk]
                key = next_key(seq.tier_key or self.tiers.root(seq.request.cache_salt), tokens)
                seq.tier_chunks, seq.tier_key = i + 1, key
                blocks = tables[seq.seq_id][i * bpc:(i + 1) * bpc]
                if self.tiers.is_known(key) or None in blocks:
                    continue  # stored already, or released behind a window before it could be saved
                tensors = tensors or self.pool.block_tensors()
                copied = {name: t.index_select(axis, _block_index(blocks, unit))
                          for name, (t, axis, unit) in tensors.items()}
                self.tiers.save(key, tokens, copied)
                self.queued_chunks += 1


def _block_index(blocks, unit: int) -> torch.Tensor:
    return (torch.as_tensor(list(blocks), dtype=torch.long)[:, None] * unit + torch.arange(unit)).flatten()
