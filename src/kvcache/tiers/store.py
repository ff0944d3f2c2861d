"""What a tier's storage must do, and the fault handling every store shares.

A store keeps bytes under keys; it knows nothing of KV.  Every call goes through ``_guard``: an exception
(the store down, a timeout, a full store refusing a write) is counted, logged once per outage, and turns the
store *down* for a back-off (doubling, capped) during which calls return at once as misses, so no request
waits on a dead store longer than one call's timeout.  After the back-off the next call tries again, which is
how a store that comes back is reconnected.
"""

from __future__ import annotations

import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

log = logging.getLogger("kvcache.tiers")

_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Latency:
    """A latency histogram (Prometheus buckets, cumulative at export), safe to update from two threads."""

    buckets = _BUCKETS

    def __init__(self):
        self.counts, self.count, self.sum = [0] * len(_BUCKETS), 0, 0.0
        self._lock = threading.Lock()

    def observe(self, seconds: float) -> None:
        with self._lock:
            self.count += 1
            self.sum += seconds
            for i, edge in enumerate(_BUCKETS):
                if seconds <= edge:
                    self.counts[i] += 1
                    break

    def snapshot(self) -> dict:
        with self._lock:
            return {"count": self.count, "sum": self.sum, "buckets": list(zip(_BUCKETS, self.counts))}


class Store(ABC):
    """Bytes under keys, with a timeout on every call (``timeout`` seconds) and the shared fault handling."""

    name = "store"

    def __init__(self, timeout: float = 1.0, backoff: float = 1.0, max_backoff: float = 30.0):
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
        self.timeout, self.backoff, self.max_backoff = timeout, backoff, max_backoff
        self.errors = 0
        self._down_until, self._delay = 0.0, backoff
        self._lock = threading.Lock()

    # --- what a store implements ------------------------------------------------------------------------------
    @abstractmethod
    def _contains(self, keys: Sequence[bytes]) -> list[bool]: ...

    @abstractmethod
    def _get(self, keys: Sequence[bytes]) -> list[bytes | None]: ...

    @abstractmethod
    def _put(self, items: Sequence[tuple[bytes, bytes]]) -> None: ...

    @abstractmethod
    def _delete(self, key: bytes) -> None: ...

    def close(self) -> None:
        """Release connections and files."""

    def describe(self) -> str:
        return self.name

    # --- the guarded calls the tiers use --------------------------------------------------------------------------
    def contains(self, keys: Sequence[bytes]) -> list[bool]:
        return self._guard(lambda: self._contains(keys), [False] * len(keys)) if keys else []

    def get(self, keys: Sequence[bytes]) -> list[bytes | None]:
        return self._guard(lambda: self._get(keys), [None] * len(keys)) if keys else []

    def put(self, items: Sequence[tuple[bytes, bytes]]) -> bool:
        return bool(items) and self._guard(lambda: (self._put(items), True)[1], False)

    def delete(self, key: bytes) -> None:
        self._guard(lambda: self._delete(key), None)

    @property
    def available(self) -> bool:
        return time.monotonic() >= self._down_until

    def _guard(self, call: Callable, default):
        if not self.available:
            return default
        try:
            result = call()
        except Exception as exc:  # noqa: BLE001 -- any store failure is a miss, never a failed request
            with self._lock:
                self.errors += 1
                first = self._delay == self.backoff
                self._down_until = time.monotonic() + self._delay
                self._delay = min(self._delay * 2, self.max_backoff)
            if first:
                log.warning("KV tier %s failed (%s: %s); computing instead, retrying in %.1f s",
                            self.describe(), type(exc).__name__, exc, self.backoff)
            return default
        with self._lock:
            if self._delay != self.backoff:
                log.warning("KV tier %s is back", self.describe())
            self._delay = self.backoff
        return result
