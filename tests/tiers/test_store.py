"""The fault handling every store shares, and the disk store on its own: timeouts turn into misses, a dead
store is skipped for a back-off and retried, writes never wait in the step, the disk tier evicts by size and
is safe with two processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import torch

from kvcache.tiers import DiskStore, KVTiers, Store


class FlakyStore(Store):
    name = "flaky"

    def __init__(self, **kw):
        super().__init__(**kw)
        self.data, self.fail, self.put_delay, self.calls = {}, False, 0.0, 0

    def _check(self):
        self.calls += 1
        if self.fail:
            raise ConnectionError("down")

    def _contains(self, keys):
        self._check()
        return [k in self.data for k in keys]

    def _get(self, keys):
        self._check()
        return [self.data.get(k) for k in keys]

    def _put(self, items):
        self._check()
        time.sleep(self.put_delay)
        self.data.update(items)

    def _delete(self, key):
        self._check()
        self.data.pop(key, None)


def test_a_failing_store_is_a_miss_then_skipped_then_retried():
    store = FlakyStore(backoff=0.2)
    store.put([(b"a", b"1")])
    store.fail = True
    assert store.get([b"a"]) == [None] and store.errors == 1
    calls = store.calls
    assert store.contains([b"a"]) == [False] and store.calls == calls  # down: not even asked
    store.fail = False
    time.sleep(0.25)
    assert store.get([b"a"]) == [b"1"] and store.available


def test_the_back_off_doubles_and_resets():
    store = FlakyStore(backoff=0.05, max_backoff=0.2)
    store.fail = True
    for expected in (0.1, 0.2, 0.2):
        store._down_until = 0
        store.get([b"x"])
        assert store._delay == expected
    store.fail, store._down_until = False, 0
    store.get([b"x"])
    assert store._delay == 0.05


class FakePool:
    block_size, spec = 4, "auto"

    def __init__(self):
        self.k = torch.zeros(2, 1, 64, 8)

    def block_tensors(self):
        return {"k": (self.k, 2, 4)}


class FakeModel:
    config = "fake"

    def state_dict(self):
        return {"w": torch.ones(3)}


def test_a_slow_store_never_slows_the_caller():
    store = FlakyStore()
    store.put_delay = 1.0
    tiers = KVTiers([store], chunk_tokens=8)
    tiers.bind(FakeModel(), FakePool())
    start = time.perf_counter()
    for i in range(3):
        tiers.save(bytes([i]) * 32, list(range(8)), {"k": torch.zeros(2, 1, 8, 8)})
    assert time.perf_counter() - start < 0.2
    assert tiers.flush(10) and len(store.data) == 3
    tiers.close()


def test_writes_past_the_queue_cap_are_dropped_and_counted():
    store = FlakyStore()
    store.put_delay = 0.5
    tiers = KVTiers([store], chunk_tokens=8, queue_bytes=2 * 2 * 8 * 8 * 4)
    tiers.bind(FakeModel(), FakePool())
    for i in range(5):
        tiers.save(bytes([i]) * 32, list(range(8)), {"k": torch.zeros(2, 1, 8, 8)})
    tiers.flush(10)
    assert tiers.saves_dropped >= 2 and len(store.data) == 5 - tiers.saves_dropped
    tiers.close()


def test_the_disk_store_evicts_least_recently_used_by_size(tmp_path):
    store = DiskStore(tmp_path, 1 << 20)
    blob = os.urandom(200 << 10)
    store.put([(b"first", blob)])
    for i in range(10):
        store.put([(b"k%d" % i, blob)])
        assert store.get([b"first"]) == [blob]  # read after every write: the most recently used survives
    assert store.volume() <= 1.3 * (1 << 20)
    assert sum(store.contains([b"k%d" % i for i in range(10)])) < 10
    store.close()


WRITER = """
import os, sys
from kvcache.tiers import DiskStore
store = DiskStore(sys.argv[1], 1 << 30)
i = 0
print("ready", flush=True)
while True:
    store.put([(b"w%d" % i, bytes([i % 256]) * (1 << 20))])
    i += 1
"""


def test_two_processes_share_a_directory_and_a_killed_writer_leaves_only_whole_entries(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline().strip() == b"ready"
        reader = DiskStore(tmp_path, 1 << 30)
        deadline = time.monotonic() + 20
        while not reader.contains([b"w3"])[0] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert reader.contains([b"w3"])[0]
    finally:
        proc.send_signal(signal.SIGKILL)  # killed mid-write
        proc.wait(10)
    keys = [k for k in reader.cache.iterkeys()]
    assert len(keys) >= 4
    for key in keys:
        (value,) = reader.get([key])
        i = int(key[1:])
        assert value == bytes([i % 256]) * (1 << 20)  # every entry that loads is whole
    reader.close()
