"""forward_batch: the flattened pass returns, in order, logits of each sequence's last token and its drafts,
equal to running each sequence alone."""

from __future__ import annotations

import torch

from kvcache.caches.paged import BatchEntry, PagedKVCache
from kvcache.engine.model_runner import forward_batch
from kvcache.model.loader import load_model


def test_rows_are_the_last_token_and_the_drafts(llama_dir):
    model = load_model(llama_dir)
    a, b = [5, 6, 7, 8, 9], [11, 12, 13]
    cache = PagedKVCache.for_model(model, num_blocks=8, block_size=4)
    with torch.inference_mode():
        logits = forward_batch(model, cache, [(a, BatchEntry(5, 5, [0, 1])), (b, BatchEntry(3, 3, [2], draft=2))])
        dense_a = model(torch.tensor([a]))[0]
        dense_b = model(torch.tensor([b]))[0]
    assert logits.shape[0] == 1 + 3
    torch.testing.assert_close(logits[0], dense_a[-1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits[1:], dense_b, atol=1e-5, rtol=1e-5)
