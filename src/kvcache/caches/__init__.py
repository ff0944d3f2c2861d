from .simple import KVCache, dense_causal_attention

__all__ = ["KVCache", "dense_causal_attention"]
