"""Which positions a bounded-attention sequence still reads: the paged engine's sliding window and sinks.

Query ``p`` attends to key ``j <= p`` when ``j < sinks`` (attention sinks, kept forever) or
``j > p - size`` (the window, itself included): the same rule as ``window:size=S,sinks=K,positions=absolute``
in single-stream ``generate`` (caches/window.py) and, with ``sinks=0``, a Mistral-style model's own
window.  Queries only move forward, so a block whose every position is behind the window of the next
query (and holds no sink) is never read again: the engine gives it back to the pool.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AttentionWindow:
    size: int  # recent positions each query attends to, itself included
    sinks: int = 0  # first positions every query attends to

    def __post_init__(self) -> None:
        if self.size < 1 or self.sinks < 0:
            raise ValueError(f"an attention window needs size >= 1 and sinks >= 0, got {self.size}, {self.sinks}")

    def sink_blocks(self, block_size: int) -> int:
        return -(-self.sinks // block_size)

    def visible_blocks(self, first_query: int, context_len: int, block_size: int) -> list[int]:
        """Indices (into a block table) of the blocks queries ``first_query..context_len-1`` read."""
        sinks = min(self.sink_blocks(block_size), -(-context_len // block_size))
        low = max(sinks, max(first_query - self.size + 1, 0) // block_size)
        return list(range(sinks)) + list(range(low, -(-context_len // block_size)))

    def releasable(self, next_query: int, block_size: int, table_len: int) -> tuple[int, int]:
        """Blocks ``[first, stop)`` no query from ``next_query`` on reads (never the table's last block)."""
        first = self.sink_blocks(block_size)
        stop = min(max(next_query - self.size + 1, 0) // block_size, table_len - 1)
        return first, max(first, stop)

    def mask(self, query_positions: torch.Tensor, key_positions: torch.Tensor) -> torch.Tensor:
        """Bool (queries, keys): True where the query attends to the key."""
        q, k = query_positions[:, None], key_positions[None, :]
        return (k <= q) & ((k < self.sinks) | (k > q - self.size))

    def blocks_held(self, block_size: int, chunk: int) -> int:
        """Most blocks a sequence holds at once when each step adds at most ``chunk`` tokens."""
        return self.sink_blocks(block_size) + -(-(self.size + chunk) // block_size) + 1
