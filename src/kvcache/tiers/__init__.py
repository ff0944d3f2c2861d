"""KV tiers behind the engine's block pool: a local disk tier that survives restarts and a shared Redis tier.

``KVTiers`` (tiers.py) is what the engine talks to; the stores (disk.py, redis_store.py) only keep bytes;
keys.py names a chunk of KV the same way in every process, and chunk.py makes each stored chunk
self-describing and verified.  docs/design.md ("KV tiers") has the key scheme, the chunk format and the faults.
"""

from .chunk import ChunkError
from .disk import DiskStore
from .redis_store import RedisStore
from .store import Store
from .tiers import KVTiers, TierStats, open_tiers

__all__ = ["ChunkError", "DiskStore", "KVTiers", "RedisStore", "Store", "TierStats", "open_tiers"]
