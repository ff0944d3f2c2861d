"""``KVTiers``: the engine's one door to the stores behind its block pool.

The engine asks, for a prompt the pool does not fully hold: how many leading chunks can the tiers supply
(``probe``), then fetches them (``fetch``: verified tensors, or fewer chunks than probed when one fails to
verify), and writes them into the blocks it allocated; the tokens they cover are not computed.  After each
step it hands over every newly completed chunk (``save``): the tensors are copied out of the pool at once
(their blocks may be reused by the next step) and encoded and written by a background thread, so a slow
store never slows a step.  Stores are tried in the order given (a disk tier before a shared Redis one); a
chunk found only in a later store is copied into the earlier ones.  Writes beyond ``queue_bytes`` waiting
are dropped and counted.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from . import chunk
from .keys import chunk_keys, model_identity, pool_identity, root_key
from .store import Latency, Store

log = logging.getLogger("kvcache.tiers")

KNOWN_KEYS = 1 << 16  # keys remembered as stored, so a shared prefix is not written again by every request


@dataclass
class TierStats:
    """One store's counters (chunks, tokens, bytes) and latency histograms."""

    lookups: int = 0            # probe calls that reached this store
    hit_chunks: int = 0         # chunks loaded from it and verified
    hit_tokens: int = 0         # prompt tokens those chunks supplied to sequences (not recomputed)
    bytes_read: int = 0
    bytes_written: int = 0
    saves: int = 0              # chunks written
    verify_failures: int = 0    # chunks read that did not verify (treated as misses and deleted)
    load_latency: Latency = field(default_factory=Latency)
    save_latency: Latency = field(default_factory=Latency)


class KVTiers:
    def __init__(self, stores: Sequence[Store], chunk_tokens: int = 256, queue_bytes: int = 512 << 20):
        if not stores:
            raise ValueError("KVTiers needs at least one store")
        if not isinstance(chunk_tokens, int) or chunk_tokens < 1:
            raise ValueError(f"kv tier chunk size must be a positive number of tokens, got {chunk_tokens!r}")
        self.stores, self.chunk_tokens, self.queue_bytes = list(stores), chunk_tokens, queue_bytes
        self.stats_by_store = {id(s): TierStats() for s in self.stores}
        self.saves_dropped = 0
        self._meta: dict | None = None
        self._root_cache: dict = {}
        self._known: OrderedDict[bytes, None] = OrderedDict()
        self._queue: queue.Queue = queue.Queue()
        self._pending_bytes = 0
        self._lock = threading.Lock()
        self._writer: threading.Thread | None = None
        self._closed = False

    # --- binding to an engine -------------------------------------------------------------------------------------
    def bind(self, model, pool) -> None:
        """Fix the identities the keys and headers carry; refuse, by name, what cannot be stored."""
        tensors = getattr(pool, "block_tensors", None)
        if tensors is None:
            raise ValueError(f"KV tiers cannot store the {type(pool).__name__} pool (kv_cache {pool.spec!r})")
        if self.chunk_tokens % pool.block_size:
            raise ValueError(f"kv tier chunk size {self.chunk_tokens} tokens is not a multiple of the engine's "
                             f"block_size {pool.block_size}: chunks must be whole blocks")
        self.pool, self.block_size = pool, pool.block_size
        self._meta = {"model": model_identity(model), "pool": pool_identity(pool)}
        self._shapes = {}  # what a verified chunk must hold: name -> (dtype, shape)
        for name, (tensor, axis, unit) in pool.block_tensors().items():
            shape = list(tensor.shape)
            shape[axis] = unit * self.chunk_tokens // pool.block_size
            self._shapes[name] = (tensor.dtype, shape)
        self._writer = threading.Thread(target=self._write_loop, name="kvcache-tier-writer", daemon=True)
        self._writer.start()

    def root(self, salt: str | None) -> bytes:
        """The key every chain of this engine's chunks starts from (model, pool, chunk size, salt)."""
        root = self._root_cache.get(salt)
        if root is None:
            root = self._root_cache[salt] = root_key(self._meta["model"], self._meta["pool"], self.chunk_tokens, salt)
        return root

    def keys(self, tokens: Sequence[int], salt: str | None, limit: int | None = None) -> list[bytes]:
        """Keys of the full chunks of ``tokens`` (at most ``limit``)."""
        return chunk_keys(self.root(salt), tokens, self.chunk_tokens, limit)

    # --- reading --------------------------------------------------------------------------------------------------
    def probe(self, keys: Sequence[bytes]) -> int:
        """How many leading chunks some store holds (a cheap existence check; ``fetch`` verifies)."""
        present = [False] * len(keys)
        for store in self.stores:
            missing = [i for i, p in enumerate(present) if not p]
            if not missing or not store.available:
                continue
            self.stats_by_store[id(store)].lookups += 1
            for i, found in zip(missing, store.contains([keys[i] for i in missing])):
                present[i] = found
        leading = 0
        while leading < len(present) and present[leading]:
            leading += 1
        return leading

    def fetch(self, keys: Sequence[bytes], tokens: Sequence[int]) -> tuple[list[dict[str, torch.Tensor]], list[Store]]:
        """The verified tensors of the leading chunks (stops at the first chunk no store can supply), and the
        store each came from."""
        found: list[dict | None] = [None] * len(keys)
        source: list[Store | None] = [None] * len(keys)
        raw: list[bytes | None] = [None] * len(keys)
        for store in self.stores:
            want = [i for i in range(len(keys)) if found[i] is None]
            if not want or not store.available:
                continue
            stats, start = self.stats_by_store[id(store)], time.perf_counter()
            datas = store.get([keys[i] for i in want])
            for i, data in zip(want, datas):
                if data is None:
                    continue
                stats.bytes_read += len(data)
                try:
                    found[i] = self._checked(chunk.decode(data, keys[i], self._meta, self._tokens(tokens, i)))
                except chunk.ChunkError as exc:
                    stats.verify_failures += 1
                    if stats.verify_failures == 1:
                        log.warning("KV tier %s: a chunk did not verify (%s); deleted, computing instead",
                                    store.describe(), exc)
                    store.delete(keys[i])
                    continue
                source[i], raw[i] = store, data
            stats.load_latency.observe(time.perf_counter() - start)
        leading = 0
        while leading < len(keys) and found[leading] is not None:
            leading += 1
        for i in range(leading):
            self._remember(keys[i])
            self.stats_by_store[id(source[i])].hit_chunks += 1
            earlier = self.stores[:self.stores.index(source[i])]
            if earlier:  # promote: the next lookup finds it in the faster tier
                self._enqueue(keys[i], raw[i], earlier)
        return found[:leading], source[:leading]

    def credit(self, sources: Sequence[Store], tokens: int) -> None:
        """``tokens`` of the fetched chunks (from ``sources``, in order) that a sequence really took."""
        for store in sources:
            used = min(self.chunk_tokens, tokens)
            if used <= 0:
                break
            self.stats_by_store[id(store)].hit_tokens += used
            tokens -= used

    # --- writing --------------------------------------------------------------------------------------------------
    def is_known(self, key: bytes) -> bool:
        with self._lock:
            return key in self._known

    def save(self, key: bytes, tokens: Sequence[int], tensors: dict[str, torch.Tensor]) -> None:
        """Queue a completed chunk (``tensors`` already copied out of the pool) for every store."""
        self._remember(key)
        self._enqueue(key, (list(tokens), tensors), self.stores)

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every queued write is done (tests, shutdown); False on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._queue.unfinished_tasks == 0:
                return True
            time.sleep(0.005)
        return False

    def close(self, timeout: float = 10.0) -> None:
        if self._closed:
            return
        self._closed = True
        if self._writer is not None:
            self.flush(timeout)
            self._queue.put(None)
            self._writer.join(timeout)
        for store in self.stores:
            store.close()

    def _enqueue(self, key: bytes, item, stores: Sequence[Store]) -> None:
        size = len(item) if isinstance(item, bytes) else sum(t.nbytes for t in item[1].values())
        with self._lock:
            if self._closed or self._pending_bytes + size > self.queue_bytes:
                self.saves_dropped += 1
                self._known.pop(key, None)
                return
            self._pending_bytes += size
        self._queue.put((key, item, list(stores), size))

    def _write_loop(self) -> None:
        while True:
            job = self._queue.get()
            try:
                if job is None:
                    return
                key, item, stores, _ = job
                data = item if isinstance(item, bytes) else chunk.encode(key, self._meta, *item)
                for store in stores:
                    if not store.available:
                        continue
                    start = time.perf_counter()
                    if store.contains([key]) == [True]:
                        continue
                    if store.put([(key, data)]):
                        stats = self.stats_by_store[id(store)]
                        stats.saves += 1
                        stats.bytes_written += len(data)
                        stats.save_latency.observe(time.perf_counter() - start)
            except Exception:  # noqa: BLE001 -- the writer must outlive any one bad chunk
                log.exception("KV tier writer: a chunk could not be written")
            finally:
                if job is not None:
                    with self._lock:
                        self._pending_bytes -= job[3]  # even after an error, or the queue cap would shrink
                self._queue.task_done()

    def _remember(self, key: bytes) -> None:
        with self._lock:
            self._known[key] = None
            self._known.move_to_end(key)
            while len(self._known) > KNOWN_KEYS:
                self._known.popitem(last=False)

    def _checked(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        got = {name: (t.dtype, list(t.shape)) for name, t in tensors.items()}
        if got != self._shapes:
            raise chunk.ChunkError(f"tensors {got} do not fit the pool's {self._shapes}")
        return tensors

    def _tokens(self, tokens: Sequence[int], i: int) -> list[int]:
        return list(tokens[i * self.chunk_tokens:(i + 1) * self.chunk_tokens])

    # --- observability --------------------------------------------------------------------------------------------
    def stats(self) -> dict:
        """Per store: counters, errors and latency histograms; and the writes dropped."""
        out = {}
        for store in self.stores:
            s = self.stats_by_store[id(store)]
            out[store.name] = {
                "lookups": s.lookups, "hit_chunks": s.hit_chunks, "hit_tokens": s.hit_tokens,
                "bytes_read": s.bytes_read, "bytes_written": s.bytes_written, "saves": s.saves,
                "errors": store.errors, "verify_failures": s.verify_failures, "available": store.available,
                "load_latency": s.load_latency.snapshot(), "save_latency": s.save_latency.snapshot()}
        return {"chunk_tokens": self.chunk_tokens, "saves_dropped": self.saves_dropped, "stores": out}


def open_tiers(disk: str | None = None, disk_size: int | None = None, store: str | None = None,
               chunk_tokens: int = 256, timeout: float = 1.0) -> KVTiers | None:
    """The tiers the command line names (``--kv-disk DIR --kv-disk-size``, ``--kv-store redis://...``), or None."""
    from .disk import DiskStore
    from .redis_store import RedisStore

    stores: list[Store] = []
    if disk is not None:
        stores.append(DiskStore(disk, disk_size if disk_size is not None else 20 << 30, timeout))
    if store is not None:
        stores.append(RedisStore(store, timeout))
    return KVTiers(stores, chunk_tokens) if stores else None
