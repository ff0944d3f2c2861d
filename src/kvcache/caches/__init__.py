from .simple import KVCache, dense_causal_attention
