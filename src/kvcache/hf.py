"""kvcache's quantized KV cache inside transformers' own ``generate`` and forward (transformers >= 5).

    from kvcache.hf import QuantizedCache
    cache = QuantizedCache(model.config, bits=4, group=32, residual=128)
    model.generate(input_ids, cache=cache, max_new_tokens=64)      # or past_key_values=cache

Each layer stores kvcache's format (caches/quantized.py): every token is
quantized once, when it leaves the full-precision residual, and never again
(transformers' own ``QuantizedCache`` re-quantizes the whole cache every
``residual_length`` tokens).  transformers' attention needs key/value tensors,
so ``update`` returns the layer expanded; the memory held between steps is the
quantized form.  kvcache's own models skip that expansion: their attention
reads the codes directly.  The layers follow transformers' ``CacheLayerMixin``:
``update``, ``get_seq_length``, ``get_mask_sizes``, ``crop`` with its
negative-count semantics, ``reorder_cache`` and the batch operations.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .caches.quantized import QuantizedKVCache
from .caches.registry import parse_spec

__all__ = ["QuantizedCache", "QuantizedLayer"]


class QuantizedLayer(CacheLayerMixin):
    """One attention layer's cache: a one-layer ``QuantizedKVCache`` made at the first ``update``."""

    is_croppable = True

    def __init__(self, **options):
        super().__init__()
        QuantizedKVCache(1, 1, 64, capacity=16, **options)  # bad options fail here, not at the first update
        self.options = options
        self.store: QuantizedKVCache | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, heads, _, dim = key_states.shape
        self.device, self.dtype = key_states.device, key_states.dtype
        self.store = QuantizedKVCache(1, heads, dim, batch=batch, dtype=key_states.dtype, **self.options)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.store.append(0, key_states, value_states)
        return self.store.materialize(0)

    def get_seq_length(self) -> int:
        return len(self.store) if self.store is not None else 0

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last ``-tokens_to_remove`` tokens (transformers 5 semantics: a count <= 0)."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative count of tokens to remove, got {tokens_to_remove}")
        if tokens_to_remove and self.store is not None:
            self.store.crop(max(0, len(self.store) + tokens_to_remove))

    def reset(self) -> None:
        if self.store is not None:
            self.store.reset()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.store is not None:
            self.store.select(beam_idx.cpu())

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.store is not None:
            self.store.select(torch.arange(self.store.batch).repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.store is not None:
            self.store.select(torch.arange(self.store.batch)[indices])

    def offload(self):  # CPU only: nothing to move
        pass

    def prefetch(self):
        pass

    @property
    def nbytes(self) -> int:
        return self.store.used_bytes if self.store is not None else 0


class QuantizedCache(Cache):
    """A transformers ``Cache`` of kvcache quantized layers: ``QuantizedCache(config, bits=4, ...)`` or
    ``QuantizedCache(config, spec="int4:group=32,residual=128")`` (options: ``kvcache caches``)."""

    def __init__(self, config=None, spec: str | None = None, **options):
        if spec is not None:
            if options:
                raise ValueError("give either a spec or options, not both")
            name, options = parse_spec(spec)
            if name not in ("int8", "int4"):
                raise ValueError(f"QuantizedCache takes an int8/int4 spec, got {name!r}")
        options.setdefault("bits", 4)
        options.setdefault("kernel", False)  # transformers attends itself: the decode kernel is not used
        layers = config.get_text_config().num_hidden_layers if config is not None else None
        if layers is None:
            super().__init__(layer_class_to_replicate=lambda: QuantizedLayer(**options))
        else:
            super().__init__(layers=[QuantizedLayer(**options) for _ in range(layers)])

    @property
    def nbytes(self) -> int:
        """Bytes held: codes, scales and the full-precision residual of every layer."""
        return sum(layer.nbytes for layer in self.layers)
