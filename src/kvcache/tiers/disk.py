"""The local disk tier, through ``diskcache``.

Why diskcache rather than plain files or lmdb: it is a SQLite index with values in files, so it is safe
with several processes sharing one directory (SQLite's locking), evicts least-recently-used entries to a
size cap by itself (``size_limit``, ``eviction_policy``), and commits an entry only after its value file is
written, so a crash mid-write leaves no entry that loads (at most an orphan file diskcache ignores).  lmdb
would need a fixed map size and its own eviction; plain files would need our own index, locking and LRU.
Whatever diskcache does, every chunk is still verified by its checksum when it is read (chunk.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import diskcache

from .store import Store


class DiskStore(Store):
    name = "disk"

    def __init__(self, directory: str | Path, size_bytes: int, timeout: float = 1.0):
        super().__init__(timeout)
        if size_bytes <= 0:
            raise ValueError(f"kv disk size must be positive, got {size_bytes!r}")
        self.directory = Path(directory)
        self.size_bytes = size_bytes
        self.cache = diskcache.Cache(str(self.directory), size_limit=size_bytes, timeout=timeout,
                                     eviction_policy="least-recently-used", disk_min_file_size=1 << 16,
                                     cull_limit=2)  # evicts 2 LRU entries per write while over the cap

    def describe(self) -> str:
        return f"disk {self.directory}"

    def _contains(self, keys: Sequence[bytes]) -> list[bool]:
        return [key in self.cache for key in keys]

    def _get(self, keys: Sequence[bytes]) -> list[bytes | None]:
        return [self.cache.get(key) for key in keys]

    def _put(self, items: Sequence[tuple[bytes, bytes]]) -> None:
        for key, data in items:
            if not self.cache.set(key, data, retry=False):
                raise OSError("diskcache refused the write")

    def _delete(self, key: bytes) -> None:
        self.cache.delete(key)

    def volume(self) -> int:
        """Bytes held on disk now."""
        return self.cache.volume()

    def close(self) -> None:
        self.cache.close()
