"""kvcache: fast, exact KV caching for autoregressive transformer decoding.

    import kvcache
    model = kvcache.load_model()                      # the shipped code model
    ids = model.tokenizer.encode("def fibonacci(n):")
    print(model.tokenizer.decode(kvcache.generate(model, ids, 64)))
"""

from .caches.contiguous import ContiguousKVCache
from .caches.paged import PagedKVCache
from .caches.simple import KVCache
from .engine.block_manager import BlockManager, OutOfBlocks
from .engine.llm import LLM
from .engine.sequence import RequestOutput, SamplingParams
from .generation.generate import generate, stream
from .memory import kv_cache_bytes, memory_report
from .model.loader import load_model
from .model.transformer import Transformer

__version__ = "0.1.0"

__all__ = [
    "KVCache", "ContiguousKVCache", "PagedKVCache", "BlockManager", "OutOfBlocks", "LLM", "SamplingParams",
    "RequestOutput", "generate", "stream", "kv_cache_bytes", "memory_report", "load_model", "Transformer",
]
