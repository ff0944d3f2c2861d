"""The shared tier in Redis or Valkey, through the ``redis`` client.

Every call has a socket timeout; existence checks and writes are pipelined, reads are one GET per chunk.
The store's size is capped by the server's own eviction: run it with ``maxmemory <bytes>`` and
``maxmemory-policy allkeys-lru``; a full server without an eviction policy refuses writes (an OOM error),
which is counted and leaves the engine computing.  Keys live under a prefix (``kvcache:`` by default).
"""

from __future__ import annotations

from collections.abc import Sequence

import redis

from .store import Store


class RedisStore(Store):
    name = "redis"

    def __init__(self, url: str, timeout: float = 1.0, prefix: str = "kvcache:", ttl: int | None = None):
        super().__init__(timeout)
        if not url.startswith(("redis://", "rediss://", "unix://", "valkey://")):
            raise ValueError(f"kv store {url!r}: expected redis://host:port/db (or rediss://, unix://)")
        self.url, self.prefix, self.ttl = url, prefix.encode(), ttl
        self.client = redis.Redis.from_url(url.replace("valkey://", "redis://", 1), socket_timeout=timeout,
                                           socket_connect_timeout=timeout, retry_on_timeout=False)

    def describe(self) -> str:
        return f"redis {self.url}"

    def _contains(self, keys: Sequence[bytes]) -> list[bool]:
        pipe = self.client.pipeline(transaction=False)
        for key in keys:
            pipe.exists(self.prefix + key)
        return [bool(n) for n in pipe.execute()]

    def _get(self, keys: Sequence[bytes]) -> list[bytes | None]:
        # One GET per chunk: measured on loopback, ~1.4 GB/s against ~0.3-0.9 GB/s for one MGET or a pipeline
        # of multi-megabyte values (the client parses one large reply at a time); a round trip is ~50 us.
        return [self.client.get(self.prefix + key) for key in keys]

    def _put(self, items: Sequence[tuple[bytes, bytes]]) -> None:
        pipe = self.client.pipeline(transaction=False)
        for key, data in items:
            pipe.set(self.prefix + key, data, ex=self.ttl)
        pipe.execute()

    def _delete(self, key: bytes) -> None:
        self.client.delete(self.prefix + key)

    def close(self) -> None:
        self.client.close()
