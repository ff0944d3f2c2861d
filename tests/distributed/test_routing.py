"""The routing decision without Ray: the prefix table (longest match, aging, bound, forgetting) and the choice
between prefix affinity and load balance."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvcache.distributed.routing import Load, PrefixTable, RouterOptions, choose


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def keys(*names: str) -> list[bytes]:
    """Chained-looking keys: key i stands for the prefix names[0..i]."""
    return ["|".join(names[:i + 1]).encode() for i in range(len(names))]


def test_longest_match_per_replica():
    table = PrefixTable()
    table.record(keys("sys", "a", "b"), "r1")
    table.record(keys("sys", "c"), "r2")
    assert table.match(keys("sys", "a", "b", "d"), ["r1", "r2"]) == {"r1": 3, "r2": 1}
    assert table.match(keys("other"), ["r1", "r2"]) == {}
    assert table.match(keys("sys", "a"), ["r2"]) == {"r2": 1}  # only the candidates asked about


def test_claims_age_out_and_the_table_is_bounded():
    clock = Clock()
    table = PrefixTable(max_keys=4, ttl_s=10, clock=clock)
    table.record(keys("a", "b"), "r1")
    clock.now = 11
    table.record(keys("c"), "r2")
    assert table.match(keys("a", "b"), ["r1", "r2"]) == {}  # expired
    assert table.sizes == {"r2": 1}
    table.record(keys("d", "e", "f", "g"), "r1")
    assert len(table.keys) == 4 and table.match(keys("c"), ["r2"]) == {}  # the oldest key went first
    assert sum(table.sizes.values()) == 4


def test_a_dead_replica_is_forgotten():
    table = PrefixTable()
    table.record(keys("a", "b"), "r1")
    table.record(keys("a"), "r2")
    table.forget("r1")
    assert table.match(keys("a", "b"), ["r1", "r2"]) == {"r2": 1}
    assert "r1" not in table.sizes and len(table.keys) == 1


def test_balanced_load_follows_the_longest_prefix():
    table = PrefixTable()
    table.record(keys("sys", "x"), "r2")
    choice = choose(keys("sys", "x", "y"), [Load("r1", 3), Load("r2", 5)], table, RouterOptions())
    assert choice.ranked == ["r2", "r1"] and choice.reason == "prefix" and choice.matched_blocks == 2


def test_no_useful_match_goes_to_the_least_loaded_then_the_smallest_holder():
    table = PrefixTable()
    table.record(keys("p", "q", "r"), "r1")
    o = RouterOptions(match_threshold=0.5)
    assert choose(keys("z"), [Load("r1", 2), Load("r2", 1)], table, o).ranked == ["r2", "r1"]
    # A 1-block match of a 4-block prompt is below the threshold: least loaded, ties by fewest held keys.
    choice = choose(keys("p", "s", "t", "u"), [Load("r1", 2), Load("r2", 2)], table, o)
    assert choice.ranked == ["r2", "r1"] and choice.reason == "least_loaded"


@pytest.mark.parametrize("batch,busy,idle,reason,first", [
    (0, 10, 2, "imbalanced", "r2"),  # 8 apart and 5x: out of balance, the prefix's home is passed over
    (0, 6, 2, "prefix", "r1"),  # 4 apart: balanced
    (0, 30, 25, "prefix", "r1"),  # within 1.5x
    (16, 14, 2, "prefix", "r1"),  # within the batch: continuous batching absorbs it, a detour costs a prefix
    (16, 30, 2, "imbalanced", "r2"),  # 14 waiting beyond the batch
])
def test_imbalance_counts_requests_waiting_beyond_the_batch(batch, busy, idle, reason, first):
    table = PrefixTable()
    table.record(keys("sys"), "r1")
    o = RouterOptions(balance_abs=4, balance_rel=1.5, batch_slots=batch)
    choice = choose(keys("sys"), [Load("r1", busy), Load("r2", idle)], table, o)
    assert (choice.reason, choice.ranked[0]) == (reason, first)


def test_a_full_pool_gets_no_prefix_matches():
    table = PrefixTable()
    table.record(keys("sys"), "r1")
    choice = choose(keys("sys"), [Load("r1", 0, kv_usage=0.99), Load("r2", 1)], table, RouterOptions())
    assert choice.reason == "least_loaded" and choice.ranked[0] == "r1"  # still the least loaded, not a match


def test_ties_between_matching_replicas_go_to_the_less_loaded():
    table = PrefixTable()
    table.record(keys("sys", "a"), "r1")
    table.record(keys("sys", "a"), "r2")
    assert choose(keys("sys", "a"), [Load("r1", 3), Load("r2", 1)], table, RouterOptions()).ranked == ["r2", "r1"]


@pytest.mark.parametrize("bad", [dict(match_threshold=1.5), dict(balance_abs=-1), dict(balance_rel=0.5),
                                 dict(max_keys=0), dict(ttl_s=0), dict(batch_slots=-1)])
def test_bad_options_are_refused_by_name(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        RouterOptions(**bad)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.lists(st.integers(0, 3), min_size=1, max_size=6), st.sampled_from(["a", "b", "c"])),
                max_size=40), st.integers(1, 12))
def test_the_table_never_exceeds_its_bound_and_sizes_add_up(records, bound):
    table = PrefixTable(max_keys=bound)
    for path, replica in records:
        table.record(keys(*map(str, path)), replica)
        assert len(table.keys) <= bound
        held = {}
        for holders in table.keys.values():
            for r in holders:
                held[r] = held.get(r, 0) + 1
        assert held == table.sizes


def test_a_prefix_keeps_its_home_after_a_detour():
    """Sent elsewhere once while load was out of balance, a prefix still goes home when load is balanced again:
    its traffic is not split between the two replicas from then on."""
    table = PrefixTable()
    for _ in range(5):
        table.record(keys("sys", "a"), "home")
    table.record(keys("sys", "a"), "detour")
    choice = choose(keys("sys", "a"), [Load("home", 3), Load("detour", 1)], table, RouterOptions())
    assert choice.ranked == ["home", "detour"] and choice.reason == "prefix"

