"""kvcache: fast, exact KV caching for transformer decoding."""
