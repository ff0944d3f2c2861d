"""Block manager for a paged KV cache, with automatic prefix caching.

The KV storage (a tensor pool owned by someone else) is split into
``num_blocks`` blocks of ``block_size`` token slots; slot ``b * block_size + i``
is offset ``i`` of block ``b``. This module only does the bookkeeping: which
blocks each live sequence uses (its *block table*), reference counts, the free
list and the prefix cache. It never touches tensors; copy-on-write is returned
as :class:`CopyOp` for the storage owner to execute before writing new KV.

Ideas from vLLM (PagedAttention, v1 ``BlockPool``/free block queue) and
nano-vllm, written as one flat class:

* Every block is in exactly one state: *in use* (ref count > 0, in some block
  tables), *evictable* (ref 0 but still findable in the prefix cache, kept in
  LRU order in an ``OrderedDict``) or *free* (ref 0, no content, in a deque).
  Allocation pops a free block first, else evicts the least recently used
  evictable block and drops its hash entry. All operations are O(1) per block.
* Prefix caching works on FULL blocks only, so the minimal shareable prefix is
  one full block (``block_size`` tokens). A full block is content-addressed by
  ``hash_block(parent_key, tokens, extra_key)``, chained from the first block
  (``parent_key=None``), so a key stands for the whole prefix up to the end of
  its block. ``extra_key`` (e.g. a LoRA id or an image hash) separates caches.
  The key is registered as soon as a block becomes full (in :meth:`allocate`
  or :meth:`append_slots`), i.e. in the step whose forward pass writes its KV.
  If that pass never runs (an exception), ``free(seq_id, written)`` drops the
  registration of every block holding an unwritten token.
  If the key is already registered to another block the first one is kept and
  the duplicate simply isn't cached.
* Collision safety: a hash match is never trusted alone. Each full block also
  stores its token tuple, its ``extra_key``, its parent's key and a *content
  id* (``uid``): two blocks share a uid only if their whole prefixes are
  verified equal token for token. A lookup must match tokens, extra_key and the
  parent's uid (the block matched just before), so even a constant hash
  function can only lower the hit rate, never return wrong KV. (Comparing the
  parent *key* would not be enough: with colliding keys a block could match a
  different prefix, or even itself at another position.)
* A hit never lets a sequence write into a shared cached block:
  :meth:`allocate` always leaves the block holding the last prompt token
  freshly allocated (at most ``len(tokens) - 1`` tokens are reported cached),
  and :meth:`append_slots` copies a shared, partially filled last block
  (after :meth:`fork`) before writing into it.
* Every call checks its arguments and capacity before mutating anything: a
  failing call (``OutOfBlocks``, ``ValueError``, ``KeyError``) leaves the
  manager exactly unchanged.

When a sequence is freed its blocks are released last-to-first, so within one
sequence the tail blocks (the least likely to be shared) are evicted first,
as in vLLM.

A sliding-window sequence gives back the blocks its attention will never read
again (:meth:`release`): their table entries become holes (``None``) and the
blocks go back to the pool -- a full block stays findable in the prefix cache,
since its KV is still exactly its prefix's.  The sequence keeps each full
block's (key, content id), so the chain of keys continues past the holes.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Hashable, Optional, Sequence

__all__ = ["BlockManager", "BlockStats", "CopyOp", "OutOfBlocks", "hash_block"]


class OutOfBlocks(RuntimeError):
    """Not enough free or evictable blocks; the manager is left unchanged."""


@dataclass(frozen=True)
class CopyOp:
    """Copy the whole KV block ``src`` to ``dst`` (copy-on-write)."""

    src: int
    dst: int


@dataclass(frozen=True)
class BlockStats:
    prefix_query_tokens: int
    prefix_hit_tokens: int
    blocks_in_use: int
    blocks_cached_evictable: int
    blocks_free: int
    evictions: int
    cow_copies: int
    hit_rate: float


def hash_block(parent_key: Optional[int], tokens: tuple, extra_key: Hashable = None) -> int:
    """Content key of a full block. Looked up as a module global, so tests can
    monkeypatch it (e.g. to a constant) to exercise collisions."""
    return hash((parent_key, tokens, extra_key))


@dataclass(slots=True)
class _Block:
    id: int
    ref: int = 0
    # Set only for full blocks when prefix caching is on:
    key: Optional[int] = None          # hash_block(parent_key, tokens, extra)
    uid: Optional[int] = None          # content id of the whole prefix (exact)
    tokens: Optional[tuple] = None
    extra: Hashable = None
    parent_uid: Optional[int] = None

    def clear(self) -> None:
        self.key = self.uid = self.tokens = self.extra = self.parent_uid = None


@dataclass(slots=True)
class _Seq:
    table: list  # block ids; None where a block was released (outside a sliding window)
    tokens: list
    extra: Hashable = None
    chain: list = None  # (key, uid) of each full block, so hashing continues past released blocks


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int = 16, enable_prefix_caching: bool = True):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._blocks = [_Block(i) for i in range(num_blocks)]
        self._free: deque[int] = deque(range(num_blocks))       # ref 0, no content
        self._evictable: OrderedDict[int, None] = OrderedDict()  # ref 0, cached; LRU first
        self._cached: dict[int, int] = {}                        # key -> block id
        self._seqs: dict[Hashable, _Seq] = {}
        self._next_uid = 0
        self.prefix_query_tokens = 0
        self.prefix_hit_tokens = 0
        self.evictions = 0
        self.cow_copies = 0

    # ---------------------------------------------------------------- queries
    def num_free_blocks(self) -> int:
        return len(self._free) + len(self._evictable)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def block_table(self, seq_id) -> list[int]:
        return list(self._seq(seq_id).table)

    def num_tokens(self, seq_id) -> int:
        return len(self._seq(seq_id).tokens)

    def token_ids(self, seq_id) -> list[int]:
        return list(self._seq(seq_id).tokens)

    def has_seq(self, seq_id) -> bool:
        return seq_id in self._seqs

    def ref_count(self, block_id: int) -> int:
        return self._blocks[block_id].ref

    def slots(self, seq_id, start: int, end: int) -> list[int]:
        seq, bs = self._seq(seq_id), self.block_size
        if not 0 <= start <= end <= len(seq.tokens):
            raise IndexError(f"slots [{start}, {end}) outside 0..{len(seq.tokens)}")
        if any(seq.table[i] is None for i in range(start // bs, self.blocks_for(end))):
            raise IndexError(f"slots [{start}, {end}) include a released block")
        return [seq.table[p // bs] * bs + p % bs for p in range(start, end)]

    def stats(self) -> BlockStats:
        q, h = self.prefix_query_tokens, self.prefix_hit_tokens
        return BlockStats(
            prefix_query_tokens=q,
            prefix_hit_tokens=h,
            blocks_in_use=self.num_blocks - self.num_free_blocks(),
            blocks_cached_evictable=len(self._evictable),
            blocks_free=len(self._free),
            evictions=self.evictions,
            cow_copies=self.cow_copies,
            hit_rate=h / q if q else 0.0,
        )

    def block_states(self) -> str:
        """One character per block: 'u' in use, 'c' cached (free, content kept for the prefix cache), 'f' free.
        A picture of the pool for a person (the server's page), O(num_blocks)."""
        states = bytearray(b"u") * self.num_blocks
        for i in self._free:
            states[i] = ord("f")
        for i in self._evictable:
            states[i] = ord("c")
        return states.decode()

    # ------------------------------------------------------------- allocation
    def can_allocate(self, token_ids: Sequence[int], extra_key: Hashable = None) -> bool:
        if not token_ids:
            return False
        hits = self._match(token_ids, extra_key)
        return self._fits(token_ids, hits)

    def cached_prefix_len(self, token_ids: Sequence[int], extra_key: Hashable = None) -> int:
        """Tokens ``allocate`` would find cached right now (a pure query, for schedulers' budgets)."""
        return len(self._match(token_ids, extra_key)) * self.block_size if token_ids else 0

    def allocate(self, seq_id, token_ids: Sequence[int], extra_key: Hashable = None) -> int:
        """Start sequence ``seq_id`` whose first ``len(token_ids)`` tokens get
        their KV written now. Reuses the longest cached prefix of full blocks
        (leaving at least the last token to compute) and returns the number of
        cached tokens, a multiple of ``block_size``."""
        if not token_ids:
            raise ValueError("token_ids must not be empty")
        if seq_id in self._seqs:
            raise ValueError(f"sequence {seq_id!r} already exists")
        hash(extra_key)  # unhashable extra_key fails here, before any mutation
        tokens = list(token_ids)
        hits = self._match(tokens, extra_key)
        if not self._fits(tokens, hits):
            raise OutOfBlocks(f"sequence {seq_id!r} needs more blocks than the {self.num_free_blocks()} available")
        table = []
        for bid in hits:  # take hits first so the evictions below can't touch them
            self._touch(bid)
            table.append(bid)
        while len(table) < self.blocks_for(len(tokens)):
            table.append(self._take())
        self._seqs[seq_id] = _Seq(table, tokens, extra_key, [(self._blocks[b].key, self._blocks[b].uid) for b in hits])
        self._hash_full(seq_id, len(hits), len(tokens) // self.block_size)
        cached = len(hits) * self.block_size
        self.prefix_query_tokens += len(tokens)
        self.prefix_hit_tokens += cached
        return cached

    def can_append(self, seq_id, num_tokens: int = 1) -> bool:
        return self.blocks_needed(seq_id, num_tokens) <= self.num_free_blocks()

    def blocks_needed(self, seq_id, num_tokens: int = 1) -> int:
        """Free blocks that appending ``num_tokens`` to the sequence would take (copy-on-write included)."""
        return self._append_need(self._seq(seq_id), num_tokens)

    def append_slots(self, seq_id, token_ids: Sequence[int]) -> list[CopyOp]:
        """Reserve slots for new tokens of a live sequence. Returns copy ops to
        execute BEFORE writing their KV (copy-on-write of a shared partial
        last block after a fork)."""
        seq = self._seq(seq_id)
        new = list(token_ids)
        if not new:
            return []
        if self._append_need(seq, len(new)) > self.num_free_blocks():
            raise OutOfBlocks(f"sequence {seq_id!r} cannot grow by {len(new)} tokens")
        ops = []
        n, table = len(seq.tokens), seq.table
        if self._needs_cow(seq):
            old, dst = table[-1], self._take()
            self._blocks[old].ref -= 1  # was > 1, so stays in use
            table[-1] = dst
            ops.append(CopyOp(old, dst))
            self.cow_copies += 1
        while len(table) < self.blocks_for(n + len(new)):
            table.append(self._take())
        seq.tokens.extend(new)
        self._hash_full(seq_id, n // self.block_size, len(seq.tokens) // self.block_size)
        return ops

    def truncate(self, seq_id, num_tokens: int) -> None:
        """Drop the sequence's tokens past the first ``num_tokens`` (rejected speculative drafts): blocks
        past them are freed, and a block left partial leaves the prefix cache, so no hit can ever return
        KV of a dropped token.  Refused (nothing changes) if it would cut into a block shared with another
        sequence."""
        seq = self._seq(seq_id)
        if not 0 <= num_tokens <= len(seq.tokens):
            raise ValueError(f"num_tokens={num_tokens!r} outside 0..{len(seq.tokens)}")
        keep, bs = self.blocks_for(num_tokens), self.block_size
        cut = seq.table[keep - 1] if num_tokens % bs and len(seq.tokens) > num_tokens else None
        if None in seq.table[max(keep - 1, 0):]:
            raise ValueError(f"cannot truncate sequence {seq_id!r} to {num_tokens} tokens: a block it would keep "
                             "partial or free was already released")
        if cut is not None and self._blocks[cut].ref > 1:
            raise ValueError(f"cannot truncate sequence {seq_id!r} inside block {cut}, which another sequence shares")
        for bid in reversed(seq.table[keep:]):
            block = self._blocks[bid]
            block.ref -= 1
            if block.ref == 0:
                self._uncache(block)
                block.clear()
                self._free.append(bid)
        if cut is not None:
            self._uncache(self._blocks[cut])
            self._blocks[cut].clear()
        del seq.table[keep:]
        del seq.tokens[num_tokens:]
        del seq.chain[num_tokens // bs:]

    def fork(self, parent_id, child_id) -> None:
        """The child shares every block of the parent (ref counts +1)."""
        parent = self._seq(parent_id)
        if child_id in self._seqs:
            raise ValueError(f"sequence {child_id!r} already exists")
        for bid in parent.table:
            if bid is not None:
                self._blocks[bid].ref += 1
        self._seqs[child_id] = _Seq(list(parent.table), list(parent.tokens), parent.extra, list(parent.chain))

    def free(self, seq_id, written: Optional[int] = None) -> None:
        """Release the sequence's blocks.  ``written``: how many of its tokens
        really have KV (default all).  Blocks holding a later token (reserved
        for a forward pass that never ran) leave the prefix cache, so no hit
        can return KV that was not written."""
        seq = self._seq(seq_id)
        if written is not None and not 0 <= written <= len(seq.tokens):
            raise ValueError(f"written={written!r} outside 0..{len(seq.tokens)}")
        del self._seqs[seq_id]
        if written is not None:
            for bid in seq.table[written // self.block_size:]:
                if bid is not None:
                    self._uncache(self._blocks[bid])
        for bid in reversed(seq.table):  # tail blocks become LRU-first
            if bid is not None:
                self._give_back(bid)

    def release(self, seq_id, first: int, stop: int) -> int:
        """Give back blocks ``first..stop-1`` of the sequence's table: positions its attention will never read
        again (behind a sliding window, past its sinks).  Their entries become holes (``None``); a block no
        one else holds returns to the pool, findable by the prefix cache if it is a cached full block.  The
        last block (still being written) is never released.  Returns how many blocks were released."""
        seq = self._seq(seq_id)
        if not 0 <= first <= stop <= len(seq.table) - 1:
            raise ValueError(f"cannot release blocks [{first}, {stop}) of a {len(seq.table)}-block table: only "
                             "blocks before the last one")
        released = 0
        for i in range(stop - 1, first - 1, -1):  # later blocks become LRU-first, as in free
            if seq.table[i] is not None:
                self._give_back(seq.table[i])
                seq.table[i] = None
                released += 1
        return released

    def _give_back(self, bid: int) -> None:
        block = self._blocks[bid]
        block.ref -= 1
        if block.ref == 0:
            if self._is_cached(block):
                self._evictable[bid] = None
            else:
                block.clear()
                self._free.append(bid)

    def reset_prefix_cache(self) -> None:
        """Drop every evictable cached block to the free list. Cached blocks
        still in use stay findable."""
        while self._evictable:
            self._evict()

    # ---------------------------------------------------------------- helpers
    def _seq(self, seq_id) -> _Seq:
        try:
            return self._seqs[seq_id]
        except KeyError:
            raise KeyError(f"unknown sequence {seq_id!r}") from None

    def _is_cached(self, block: _Block) -> bool:
        return block.key is not None and self._cached.get(block.key) == block.id

    def _uncache(self, block: _Block) -> None:
        """Make a block unfindable by the prefix cache.  Sequences that hit it in
        the same failed pass still hold it; they are freed with it (the engine
        rolls back the whole batch), so nothing grows on top of it."""
        if self._is_cached(block):
            del self._cached[block.key]

    def _lookup(self, key: int, tokens: tuple, extra, parent_uid) -> Optional[int]:
        """Block cached under ``key`` iff its content truly matches, else None."""
        bid = self._cached.get(key)
        if bid is None:
            return None
        b = self._blocks[bid]
        if b.tokens == tokens and b.extra == extra and b.parent_uid == parent_uid:
            return bid
        return None

    def _match(self, tokens: Sequence[int], extra) -> list[int]:
        """Longest chain of cached full blocks, at most (len-1)//block_size."""
        if not self.enable_prefix_caching:
            return []
        bs, hits, pkey, puid = self.block_size, [], None, None
        for i in range((len(tokens) - 1) // bs):
            block_tokens = tuple(tokens[i * bs:(i + 1) * bs])
            key = hash_block(pkey, block_tokens, extra)
            bid = self._lookup(key, block_tokens, extra, puid)
            if bid is None:
                break
            hits.append(bid)
            pkey, puid = key, self._blocks[bid].uid
        return hits

    def _fits(self, tokens: Sequence[int], hits: list[int]) -> bool:
        # Hits on evictable blocks take them out of the allocatable pool.
        revived = sum(1 for bid in hits if self._blocks[bid].ref == 0)
        need = self.blocks_for(len(tokens)) - len(hits)
        return need <= self.num_free_blocks() - revived

    def _needs_cow(self, seq: _Seq) -> bool:
        return len(seq.tokens) % self.block_size != 0 and self._blocks[seq.table[-1]].ref > 1

    def _append_need(self, seq: _Seq, num_tokens: int) -> int:
        if num_tokens <= 0:
            return 0
        grow = self.blocks_for(len(seq.tokens) + num_tokens) - len(seq.table)
        return grow + self._needs_cow(seq)

    def _touch(self, bid: int) -> None:
        block = self._blocks[bid]
        if block.ref == 0:
            del self._evictable[bid]
        block.ref += 1

    def _take(self) -> int:
        """A block with ref 1 and no content: free list first, else evict LRU."""
        bid = self._free.popleft() if self._free else self._evict(to_free=False)
        self._blocks[bid].ref = 1
        return bid

    def _evict(self, to_free: bool = True) -> int:
        bid, _ = self._evictable.popitem(last=False)
        block = self._blocks[bid]
        del self._cached[block.key]
        block.clear()
        if to_free:
            self._free.append(bid)
        else:
            self.evictions += 1
        return bid

    def _hash_full(self, seq_id, start: int, stop: int) -> None:
        """Give blocks start..stop-1 of the sequence (just filled) their key and
        content id, and register the key unless another block already has it."""
        if not self.enable_prefix_caching:
            return
        seq, bs = self._seqs[seq_id], self.block_size
        for i in range(start, stop):
            block = self._blocks[seq.table[i]]
            pkey, puid = seq.chain[i - 1] if i else (None, None)
            tokens = tuple(seq.tokens[i * bs:(i + 1) * bs])
            key = hash_block(pkey, tokens, seq.extra)
            same = self._lookup(key, tokens, seq.extra, puid)
            if same is not None:
                uid = self._blocks[same].uid
            else:
                uid, self._next_uid = self._next_uid, self._next_uid + 1
            block.key, block.uid, block.tokens, block.extra, block.parent_uid = key, uid, tokens, seq.extra, puid
            seq.chain.append((key, uid))
            self._cached.setdefault(key, block.id)
