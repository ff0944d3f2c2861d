import copy

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from kvcache.engine import block_manager as bm_mod
from kvcache.engine.block_manager import BlockManager, CopyOp, OutOfBlocks

BS = 4


def snapshot(bm):
    return copy.deepcopy(vars(bm))


def registered_tokens(bm):
    """Token tuples of every block findable in the prefix cache."""
    return {bm._blocks[bid].tokens for bid in bm._cached.values()}


# ------------------------------------------------------------------ unit tests
def test_allocate_and_free_counts():
    bm = BlockManager(8, BS)
    assert bm.blocks_for(0) == 0 and bm.blocks_for(4) == 1 and bm.blocks_for(5) == 2
    assert bm.allocate("a", list(range(10))) == 0
    assert bm.block_table("a") == [0, 1, 2]
    assert bm.num_tokens("a") == 10 and bm.has_seq("a")
    assert bm.num_free_blocks() == 5
    assert [bm.ref_count(b) for b in range(4)] == [1, 1, 1, 0]
    assert bm.slots("a", 3, 6) == [3, 4, 5]
    assert bm.slots("a", 8, 10) == [8, 9]
    with pytest.raises(IndexError):
        bm.slots("a", 0, 11)
    s = bm.stats()
    assert (s.blocks_in_use, s.blocks_free, s.blocks_cached_evictable) == (3, 5, 0)

    bm.free("a")
    assert not bm.has_seq("a")
    s = bm.stats()
    # the two full blocks stay cached (evictable), the partial one is free
    assert (s.blocks_in_use, s.blocks_cached_evictable, s.blocks_free) == (0, 2, 6)
    assert bm.num_free_blocks() == 8
    with pytest.raises(KeyError):
        bm.free("a")


def test_prefix_hit_and_backoff():
    bm = BlockManager(16, BS)
    prompt = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    assert bm.allocate("a", prompt) == 0
    a = bm.block_table("a")

    assert bm.allocate("b", prompt[:8] + [42]) == 8
    b = bm.block_table("b")
    assert b[:2] == a[:2] and b[2] not in a
    assert bm.ref_count(a[0]) == bm.ref_count(a[1]) == 2

    # The whole prompt hits: back off so the block with the last token is fresh.
    assert bm.allocate("c", prompt[:8]) == 4
    c = bm.block_table("c")
    assert c[0] == a[0] and c[1] not in a
    assert bm.ref_count(a[1]) == 2
    assert bm.allocate("d", prompt[:4]) == 0
    assert bm.block_table("d")[0] != a[0]

    # Partial (non-full) blocks are never shared.
    assert bm.allocate("e", prompt + [11]) == 8
    assert bm.block_table("e")[2] != a[2]

    s = bm.stats()
    assert s.prefix_query_tokens == 10 + 9 + 8 + 4 + 11
    assert s.prefix_hit_tokens == 8 + 4 + 8
    assert s.hit_rate == pytest.approx(20 / 42)


def test_extra_key_separates_caches():
    bm = BlockManager(16, BS)
    prompt = list(range(9))
    bm.allocate("a", prompt, extra_key="lora1")
    assert bm.allocate("b", prompt, extra_key="lora2") == 0
    assert bm.allocate("c", prompt) == 0
    assert bm.allocate("d", prompt, extra_key="lora1") == 8
    assert bm.block_table("d")[:2] == bm.block_table("a")[:2]
    with pytest.raises(TypeError):
        bm.allocate("e", prompt, extra_key=[1])
    assert not bm.has_seq("e")


def test_hit_on_evictable_blocks():
    bm = BlockManager(6, BS)
    prompt = list(range(9))
    bm.allocate("a", prompt)
    a = bm.block_table("a")
    bm.free("a")
    assert bm.stats().blocks_cached_evictable == 2
    assert bm.can_allocate(prompt)
    assert bm.allocate("b", prompt) == 8
    assert bm.block_table("b")[:2] == a[:2]
    assert bm.ref_count(a[0]) == bm.ref_count(a[1]) == 1
    s = bm.stats()
    assert (s.blocks_cached_evictable, s.blocks_in_use, s.evictions) == (0, 3, 0)


def test_lru_eviction_order():
    bm = BlockManager(4, BS)
    prompts = {name: [10 * i + j for j in range(BS)] for i, name in enumerate("ABCD")}
    for name, p in prompts.items():
        bm.allocate(name, p)
    block = {name: bm.block_table(name)[0] for name in prompts}
    for name in "ACB":  # freed in this order -> LRU order A, C, B
        bm.free(name)
    assert list(bm._evictable) == [block["A"], block["C"], block["B"]]

    bm.allocate("E", [99] * BS)  # evicts the least recently freed: A
    assert bm.block_table("E") == [block["A"]]
    assert bm.stats().evictions == 1



def test_hit_refreshes_lru_position():
    bm = BlockManager(3, BS)
    a, b, c = [1, 1, 1, 1], [2, 2, 2, 2], [3, 3, 3, 3]
    for name, p in zip("abc", (a, b, c)):
        bm.allocate(name, p)
        bm.free(name)
    blk_a, blk_b, blk_c = list(bm._evictable)  # LRU order a, b, c
    # Hit a: it leaves the evictable set; its fresh tail block evicts b (the LRU).
    assert bm.allocate("a2", a + [0]) == BS
    assert bm.block_table("a2") == [blk_a, blk_b]
    bm.free("a2")  # a is now the most recently used; the partial tail goes to the free list
    assert list(bm._evictable) == [blk_c, blk_a] and list(bm._free) == [blk_b]
    bm.allocate("x", [7] * BS)  # truly free blocks are used before evicting
    assert bm.block_table("x") == [blk_b] and bm.stats().evictions == 1
    bm.allocate("y", [8] * BS)  # c was freed after a, but a was used since
    assert bm.block_table("y") == [blk_c] and bm.stats().evictions == 2
    # a + [5] would hit a and then need a fresh block, but a's is the only one left
    assert bm.num_free_blocks() == 1 and not bm.can_allocate(a + [5])
    with pytest.raises(OutOfBlocks):
        bm.allocate("a3", a + [5])
    assert bm.can_allocate([9] * BS)


def test_free_releases_tail_blocks_first():
    bm = BlockManager(4, BS)
    bm.allocate("a", list(range(3 * BS)))
    t = bm.block_table("a")
    bm.free("a")
    assert list(bm._evictable) == t[::-1]


def a_tuple_cached(bm, tokens):
    return tuple(tokens) in registered_tokens(bm)


def test_stale_hash_removed_on_reuse():
    bm = BlockManager(2, BS)
    a = [1, 2, 3, 4]
    bm.allocate("a", a)
    bm.free("a")
    assert a_tuple_cached(bm, a)
    bm.allocate("b", [5, 6, 7, 8, 9, 10, 11, 12])  # free block first, then evicts a's
    assert bm.stats().evictions == 1
    assert not a_tuple_cached(bm, a)
    bm.free("b")
    assert bm.allocate("c", a + [0]) == 0  # a's content is gone: miss
    for key, bid in bm._cached.items():
        assert bm._blocks[bid].key == key


def test_collision_safety_constant_hash(monkeypatch):
    monkeypatch.setattr(bm_mod, "hash_block", lambda parent, tokens, extra: 0)
    bm = BlockManager(32, BS)
    x, y = [1, 2, 3, 4], [5, 6, 7, 8]
    bm.allocate("a", x + x + [9])  # block 0 takes key 0; block 1 is a duplicate key
    a = bm.block_table("a")
    assert len(bm._cached) == 1

    # Same tokens [x, x]: block 1 collides with block 0 and has the same tokens,
    # but a different prefix. Must NOT be returned (it would even repeat a block id).
    assert bm.allocate("b", x + x + [9]) == BS
    b = bm.block_table("b")
    assert b[0] == a[0] and b[1] not in (a[0], a[1])

    # Different first block: key 0 maps to x's block, tokens differ -> miss.
    assert bm.allocate("c", y + x + [9]) == 0
    assert bm.allocate("d", y + [0]) == 0
    assert bm.allocate("e", x + [0], extra_key="other") == 0

    for seq in "abcde":
        table, toks = bm.block_table(seq), bm.token_ids(seq)
        for i, bid in enumerate(table):
            blk = bm._blocks[bid]
            if blk.tokens is not None:
                assert list(blk.tokens) == toks[i * BS:(i + 1) * BS]
        assert len(set(table)) == len(table)

    # Also through the evictable cache.
    for seq in "abcde":
        bm.free(seq)
    assert bm.allocate("f", y + y + [1]) == 0
    assert bm.allocate("g", x + [3]) == BS


def test_cow_after_fork():
    bm = BlockManager(8, BS)
    bm.allocate("p", [1, 2, 3, 4, 5, 6])  # block 0 full, block 1 holds 2 tokens
    p0, p1 = bm.block_table("p")
    bm.fork("p", "c")
    assert bm.block_table("c") == [p0, p1] and bm.token_ids("c") == bm.token_ids("p")
    assert bm.ref_count(p0) == bm.ref_count(p1) == 2

    ops = bm.append_slots("c", [7])
    c = bm.block_table("c")
    assert ops == [CopyOp(p1, c[1])]
    assert c[0] == p0 and c[1] != p1
    assert bm.ref_count(p1) == 1 and bm.ref_count(c[1]) == 1 and bm.ref_count(p0) == 2
    assert bm.stats().cow_copies == 1
    # the parent now owns its partial block alone: no copy
    assert bm.append_slots("p", [8]) == []
    assert bm.block_table("p") == [p0, p1]
    assert bm.token_ids("p") == [1, 2, 3, 4, 5, 6, 8]
    assert bm.token_ids("c") == [1, 2, 3, 4, 5, 6, 7]
    assert bm.slots("c", 4, 7) == [c[1] * BS + i for i in range(3)]


def test_fork_with_full_last_block_needs_no_copy():
    bm = BlockManager(8, BS)
    bm.allocate("p", list(range(8)))
    bm.fork("p", "c")
    assert bm.append_slots("c", [100]) == []
    t = bm.block_table("c")
    assert t[:2] == bm.block_table("p") and len(t) == 3
    assert bm.ref_count(t[0]) == bm.ref_count(t[1]) == 2 and bm.ref_count(t[2]) == 1
    assert bm.stats().cow_copies == 0


def test_decode_registers_blocks_as_they_fill():
    bm = BlockManager(8, BS)
    bm.allocate("a", [1, 2, 3])
    assert bm.append_slots("a", [4]) == []
    assert bm.append_slots("a", [5, 6, 7, 8, 9]) == []
    assert bm.block_table("a") == [0, 1, 2]
    assert bm.allocate("b", [1, 2, 3, 4, 5, 6, 7, 8, 0]) == 8
    assert bm.block_table("b")[:2] == [0, 1]


def test_failing_calls_leave_state_unchanged():
    bm = BlockManager(4, BS)
    bm.allocate("a", [1, 2, 3, 4, 5, 6])
    bm.fork("a", "b")
    bm.allocate("c", [7, 8, 9, 10, 11])  # all 4 blocks used
    bm.free("c")  # one cached evictable block + one free block
    bm.allocate("d", [0])  # takes the free block
    before = snapshot(bm)

    def unchanged():
        assert vars(bm) == before

    big = list(range(100))
    assert not bm.can_allocate(big)
    with pytest.raises(OutOfBlocks):
        bm.allocate("x", big)
    unchanged()
    # One cached hit (evictable) + 2 fresh blocks: the hit block itself can't be
    # counted as allocatable, so this must fail cleanly.
    need = [7, 8, 9, 10, 0, 0, 0, 0, 1]
    assert not bm.can_allocate(need)
    with pytest.raises(OutOfBlocks):
        bm.allocate("x", need)
    unchanged()
    assert not bm.can_append("a", 7)
    with pytest.raises(OutOfBlocks):
        bm.append_slots("a", list(range(7)))
    unchanged()
    # CoW plus one more block needed (2 > 1 available)
    assert not bm.can_append("b", 3)
    with pytest.raises(OutOfBlocks):
        bm.append_slots("b", [1, 2, 3])
    unchanged()
    for call, exc in [
        (lambda: bm.allocate("a", [1]), ValueError),
        (lambda: bm.allocate("x", []), ValueError),
        (lambda: bm.append_slots("zz", [1]), KeyError),
        (lambda: bm.fork("zz", "y"), KeyError),
        (lambda: bm.fork("a", "b"), ValueError),
        (lambda: bm.free("zz"), KeyError),
        (lambda: bm.block_table("zz"), KeyError),
    ]:
        with pytest.raises(exc):
            call()
        unchanged()
    assert bm.append_slots("a", []) == []
    unchanged()
    # and the same calls succeed once capacity exists
    assert bm.can_append("b", 2)
    assert len(bm.append_slots("b", [1, 2])) == 1


def test_prefix_caching_disabled():
    bm = BlockManager(4, BS, enable_prefix_caching=False)
    bm.allocate("a", list(range(9)))
    bm.free("a")
    assert bm.stats().blocks_cached_evictable == 0 and bm.stats().blocks_free == 4
    assert bm.allocate("b", list(range(9))) == 0
    assert not bm._cached


def test_reset_prefix_cache():
    bm = BlockManager(8, BS)
    bm.allocate("a", list(range(9)))
    bm.allocate("b", [50, 51, 52, 53, 54])
    bm.free("a")
    assert bm.stats().blocks_cached_evictable == 2
    bm.reset_prefix_cache()
    s = bm.stats()
    assert (s.blocks_cached_evictable, s.blocks_free, s.blocks_in_use, s.evictions) == (0, 6, 2, 0)
    assert bm.allocate("c", list(range(9))) == 0
    assert bm.allocate("d", [50, 51, 52, 53, 0]) == BS  # in-use cached blocks stay


def test_free_unwritten_blocks_leave_the_prefix_cache():
    """A forward pass that never ran: the blocks its tokens filled must not be hit later."""
    bm = BlockManager(8, BS)
    prompt = list(range(10))
    bm.allocate("a", prompt)  # registers blocks 0 and 1 (full), KV not written yet
    bm.free("a", written=0)
    assert bm.stats().blocks_cached_evictable == 0 and bm.stats().blocks_free == 8
    assert bm.allocate("b", prompt) == 0
    # written up to token 6: block 0 holds only written KV and stays cached, block 1 does not
    bm.free("b", written=6)
    assert bm.stats().blocks_cached_evictable == 1
    assert bm.allocate("c", prompt) == BS


def test_free_unwritten_decode_block():
    bm = BlockManager(8, BS)
    bm.allocate("a", [1, 2, 3])
    bm.append_slots("a", [4])  # fills block 0 (registered) in a pass that is interrupted
    bm.free("a", written=3)
    assert bm.allocate("b", [1, 2, 3, 4, 5]) == 0
    bm.append_slots("b", [6])
    bm.free("b", written=6)  # everything written: block 0 stays cached
    assert bm.allocate("c", [1, 2, 3, 4, 5]) == BS


def test_free_unwritten_shared_in_the_same_pass():
    """b hits a's block in the pass that fills it; rolling back both leaves nothing cached."""
    for order in ("ab", "ba"):
        bm = BlockManager(8, BS)
        bm.allocate("a", list(range(9)))
        assert bm.allocate("b", list(range(8)) + [42]) == 2 * BS
        written = {"a": 0, "b": 2 * BS}  # b thinks a's blocks are written
        for seq in order:
            bm.free(seq, written[seq])
        assert bm.stats().blocks_cached_evictable == 0 and bm.num_free_blocks() == 8
        assert bm.allocate("c", list(range(9))) == 0


def test_free_rejects_bad_written_count():
    bm = BlockManager(8, BS)
    bm.allocate("a", [1, 2, 3])
    before = snapshot(bm)
    for bad in (-1, 4):
        with pytest.raises(ValueError, match="written"):
            bm.free("a", bad)
        assert vars(bm) == before


# ------------------------------------------------------- stateful model check
PREFIXES = [
    [],
    [1, 2, 3, 4],
    [1, 2, 3, 4, 5, 6, 7, 8],
    [1, 2, 3, 4, 1, 2, 3, 4],
    [5, 6, 7, 8, 9],
    [0, 0, 0, 0, 0, 0, 0, 0],
]


def content(extra, tokens, p):
    """What the KV at position p really depends on: the whole prefix (and extra)."""
    return (extra, tuple(tokens[: p + 1]))


class BlockManagerMachine(RuleBasedStateMachine):
    NUM_BLOCKS = 10
    CACHING = True

    def __init__(self):
        super().__init__()
        self.bm = BlockManager(self.NUM_BLOCKS, BS, enable_prefix_caching=self.CACHING)
        self.storage = {}  # slot -> content written there (the shadow KV pool)
        self.tokens = {}  # seq -> token ids (shadow)
        self.extra = {}
        self.history = []  # (prompt, extra_key) of successful allocations
        self.next_id = 0
        self.tables = {}  # seq -> its block table after the previous rule
        self.released = {}  # seq -> blocks of its table released (a sliding window moved past them)
        self.cow = {}  # seq -> copy ops returned by the previous rule

    def new_id(self):
        self.next_id += 1
        return self.next_id

    def write(self, seq, start, end):
        toks = self.tokens[seq]
        for p, slot in zip(range(start, end), self.bm.slots(seq, start, end)):
            self.storage[slot] = content(self.extra[seq], toks, p)

    @rule(
        prefix=st.sampled_from(PREFIXES),
        suffix=st.lists(st.integers(0, 3), max_size=6),
        extra=st.sampled_from([None, None, "x"]),
    )
    def allocate(self, prefix, suffix, extra):
        self.do_allocate(prefix + suffix or [0], extra)

    @precondition(lambda self: self.history)
    @rule(data=st.data(), suffix=st.lists(st.integers(0, 3), max_size=2))
    def allocate_again(self, data, suffix):
        """Re-send an earlier prompt (often now in the evictable cache)."""
        toks, extra = data.draw(st.sampled_from(self.history))
        self.do_allocate(toks + suffix, extra)

    def do_allocate(self, toks, extra):
        seq = self.new_id()
        expect = self.bm.can_allocate(toks, extra)
        before = snapshot(self.bm)
        try:
            cached = self.bm.allocate(seq, toks, extra)
        except OutOfBlocks:
            assert not expect
            assert vars(self.bm) == before
            return
        assert expect
        assert cached % BS == 0 and 0 <= cached <= len(toks) - 1
        if not self.CACHING:
            assert cached == 0
        self.tokens[seq], self.extra[seq] = list(toks), extra
        self.history.append((list(toks), extra))
        # the reused slots must already hold exactly this prefix's KV
        for p, slot in enumerate(self.bm.slots(seq, 0, cached)):
            assert self.storage.get(slot) == content(extra, toks, p)
        self.write(seq, cached, len(toks))

    @precondition(lambda self: self.tokens)
    @rule(data=st.data(), new=st.lists(st.integers(0, 3), min_size=1, max_size=6))
    def append(self, data, new):
        seq = data.draw(st.sampled_from(sorted(self.tokens)))
        expect = self.bm.can_append(seq, len(new))
        before = snapshot(self.bm)
        try:
            ops = self.bm.append_slots(seq, new)
        except OutOfBlocks:
            assert not expect
            assert vars(self.bm) == before
            return
        assert expect
        assert len(ops) <= 1
        self.cow[seq] = ops
        self.copy_then_write(seq, ops, new)

    def copy_then_write(self, seq, ops, new):
        """Execute the copy-on-write ops, then write the new tokens' KV (the engine's order)."""
        n = len(self.tokens[seq])
        for op in ops:
            assert self.bm.ref_count(op.src) >= 1 and self.bm.ref_count(op.dst) == 1
            for i in range(BS):
                src = self.storage.get(op.src * BS + i)
                if src is None:
                    self.storage.pop(op.dst * BS + i, None)
                else:
                    self.storage[op.dst * BS + i] = src
        self.tokens[seq].extend(new)
        self.write(seq, n, n + len(new))

    @precondition(lambda self: self.tokens)
    @rule(data=st.data(), draft=st.lists(st.integers(0, 3), min_size=1, max_size=7), kept=st.integers(0, 7))
    def speculate(self, data, draft, kept):
        """Draft tokens get slots and KV, then the rejected ones are truncated away (speculative decoding)."""
        seq = data.draw(st.sampled_from(sorted(self.tokens)))
        if not self.bm.can_append(seq, len(draft)):
            return
        self.cow[seq] = ops = self.bm.append_slots(seq, draft)
        self.copy_then_write(seq, ops, draft)
        keep = len(self.tokens[seq]) - len(draft) + min(kept, len(draft))
        before = snapshot(self.bm)
        try:
            self.bm.truncate(seq, keep)
        except ValueError:  # only when cutting into a shared or released block; nothing changed
            assert vars(self.bm) == before
            return
        del self.tokens[seq][keep:]
        assert self.bm.num_tokens(seq) == keep and len(self.bm.block_table(seq)) == self.bm.blocks_for(keep)

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def fork(self, data):
        parent = data.draw(st.sampled_from(sorted(self.tokens)))
        child = self.new_id()
        self.bm.fork(parent, child)
        self.tokens[child] = list(self.tokens[parent])
        self.extra[child] = self.extra[parent]
        self.released[child] = set(self.released.get(parent, ()))

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def release(self, data):
        """A sliding window moved on: blocks behind it go back to the pool (holes in the table)."""
        seq = data.draw(st.sampled_from(sorted(self.tokens)))
        last = len(self.bm.block_table(seq)) - 1
        first = data.draw(st.integers(0, max(last, 0)))
        stop = data.draw(st.integers(first, max(last, first)))
        if last < 0:
            return
        before = snapshot(self.bm)
        if stop > last:
            with pytest.raises(ValueError):
                self.bm.release(seq, first, stop)
            assert vars(self.bm) == before
            return
        held = [b for b in self.bm.block_table(seq)[first:stop] if b is not None]
        assert self.bm.release(seq, first, stop) == len(held)
        self.released.setdefault(seq, set()).update(range(first, stop))
        assert all(self.bm.block_table(seq)[i] is None for i in range(first, stop))

    @rule(
        prefix=st.sampled_from(PREFIXES),
        suffix=st.lists(st.integers(0, 3), max_size=6),
        extra=st.sampled_from([None, "x"]),
    )
    def interrupted_allocate(self, prefix, suffix, extra):
        """allocate, then the forward pass raises: nothing is written and the sequence is freed."""
        toks = prefix + suffix or [0]
        if not self.bm.can_allocate(toks, extra):
            return
        seq = self.new_id()
        cached = self.bm.allocate(seq, toks, extra)
        self.bm.free(seq, written=cached)

    @precondition(lambda self: self.tokens)
    @rule(data=st.data(), new=st.lists(st.integers(0, 3), min_size=1, max_size=6))
    def interrupted_append(self, data, new):
        """append_slots, then the pass raises before its copies and writes; the sequence is freed."""
        seq = data.draw(st.sampled_from(sorted(self.tokens)))
        if not self.bm.can_append(seq, len(new)):
            return
        n = len(self.tokens[seq])
        self.bm.append_slots(seq, new)
        self.bm.free(seq, written=n)
        del self.tokens[seq], self.extra[seq]

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def free(self, data):
        seq = data.draw(st.sampled_from(sorted(self.tokens)))
        self.bm.free(seq)
        del self.tokens[seq], self.extra[seq]
        self.released.pop(seq, None)

    @rule()
    def reset_prefix_cache(self):
        self.bm.reset_prefix_cache()

    @rule()
    def free_all(self):
        for seq in list(self.tokens):
            self.bm.free(seq)
        self.tokens.clear()
        self.extra.clear()
        self.check_no_leak()

    def check_no_leak(self):
        s = self.bm.stats()
        assert s.blocks_in_use == 0
        assert s.blocks_free + s.blocks_cached_evictable == self.NUM_BLOCKS
        assert all(b.ref == 0 for b in self.bm._blocks)

    @invariant()
    def block_states(self):
        bm = self.bm
        refs = [0] * bm.num_blocks
        for seq in self.tokens:
            table = bm.block_table(seq)
            held = [b for b in table if b is not None]
            assert len(set(held)) == len(held)
            assert {i for i, b in enumerate(table) if b is None} <= self.released.get(seq, set())
            assert table[-1] is not None
            assert len(table) == bm.blocks_for(len(self.tokens[seq]))
            assert bm.num_tokens(seq) == len(self.tokens[seq])
            assert bm.token_ids(seq) == self.tokens[seq]
            for bid in held:
                refs[bid] += 1
        assert len(set(bm._free)) == len(bm._free)
        free, evictable = set(bm._free), set(bm._evictable)
        for b in bm._blocks:
            assert b.ref == refs[b.id]
            assert (b.ref == 0) == (b.id in free or b.id in evictable)
            assert not (b.id in free and b.id in evictable)
            if b.id in evictable:
                assert bm._cached.get(b.key) == b.id
            if b.id in free:
                assert b.key is None and b.tokens is None
        for key, bid in bm._cached.items():
            assert bm._blocks[bid].key == key and bid not in free
        if not self.CACHING:
            assert not bm._cached and not evictable
        s = bm.stats()
        assert s.blocks_in_use + s.blocks_free + s.blocks_cached_evictable == bm.num_blocks
        assert s.blocks_in_use == sum(1 for r in refs if r)

    @invariant()
    def tables_only_append(self):
        """A block table changes only by appending blocks, or by copy-on-write swapping its
        last (partially filled, shared) block for the private copy the op names."""
        for seq, (old, n) in self.tables.items():
            if seq not in self.tokens:
                continue
            new = self.bm.block_table(seq)
            if len(new) < len(old):  # a speculative rollback
                old = old[:len(new)]
            new_kept = [b if i not in self.released.get(seq, ()) else None for i, b in enumerate(new)]
            old = [b if i not in self.released.get(seq, ()) else None for i, b in enumerate(old)]
            new = new_kept
            if new[: len(old)] != old:
                assert n % BS != 0, "only a partially filled last block is ever swapped"
                assert new[: len(old) - 1] == old[:-1], (old, new)
                assert CopyOp(old[-1], new[len(old) - 1]) in self.cow.get(seq, []), (old, new)
        self.tables = {seq: (self.bm.block_table(seq), len(toks)) for seq, toks in self.tokens.items()}
        self.cow = {}

    @invariant()
    def contents(self):
        """Every sequence's slots hold exactly its own (prefix-dependent) KV."""
        for seq, toks in self.tokens.items():
            table = self.bm.block_table(seq)
            for p in range(len(toks)):
                if table[p // BS] is None:  # released: never read again
                    continue
                slot = table[p // BS] * BS + p % BS
                assert self.storage.get(slot) == content(self.extra[seq], toks, p), (seq, p)

    def teardown(self):
        for seq in list(self.tokens):
            self.bm.free(seq)
        self.tokens.clear()
        self.check_no_leak()


class NoCachingMachine(BlockManagerMachine):
    CACHING = False


def _settings(n):
    return settings(max_examples=n, stateful_step_count=50, deadline=None)


TestBlockManagerMachine = BlockManagerMachine.TestCase
TestBlockManagerMachine.settings = _settings(100)


def test_state_machine_without_prefix_caching():
    run_state_machine_as_test(NoCachingMachine, settings=_settings(20))


@pytest.mark.parametrize(
    "weak_hash",
    [lambda p, t, e: hash((p, t, e)) % 3, lambda p, t, e: 0],
    ids=["mod3", "constant"],
)
def test_state_machine_with_colliding_hash(monkeypatch, weak_hash):
    monkeypatch.setattr(bm_mod, "hash_block", weak_hash)
    run_state_machine_as_test(BlockManagerMachine, settings=_settings(40))
