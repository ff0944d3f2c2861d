"""``LLM``: the serving engine.  Paged KV memory, prefix caching, continuous batching.

    llm = LLM("path/to/model", kv_memory="1GiB")
    outs = llm.generate(["def fib(n):", "import os"], SamplingParams(max_new_tokens=64))

Each ``step`` asks the scheduler for a batch, flattens its tokens into one
forward pass over the paged cache, samples one token per sequence and
retires finished ones.  Results equal running each request alone.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable
from pathlib import Path

import torch

from ..caches.paged import BatchEntry, PagedKVCache
from ..generation.sampling import sample
from ..model.loader import load_model
from ..model.transformer import Transformer
from .block_manager import BlockManager
from .scheduler import Scheduler
from .sequence import CompletionOutput, Request, RequestOutput, SamplingParams, Sequence, Status

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "KB": 1 << 10, "KIB": 1 << 10, "M": 1 << 20, "MB": 1 << 20,
          "MIB": 1 << 20, "G": 1 << 30, "GB": 1 << 30, "GIB": 1 << 30}


def parse_bytes(text: str | int) -> int:
    """'2GiB', '512MB', '1.5G' or an int -> bytes (binary units)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([\d.]+)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).upper() not in _UNITS:
        raise ValueError(f"cannot parse a memory size from {text!r} (examples: '2GiB', '512MB')")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


class LLM:
    def __init__(
        self,
        model: Transformer | str | Path | None = None,
        kv_memory: str | int = "1GiB",
        num_blocks: int | None = None,
        block_size: int = 16,
        max_batch_tokens: int = 2048,
        max_num_seqs: int = 256,
        enable_prefix_caching: bool = True,
    ):
        self.model = model if isinstance(model, Transformer) else load_model(model)
        self.config = self.model.config
        self.model.pack_for_batching()
        per_block = PagedKVCache.bytes_per_block(self.config, block_size, self.model.dtype)
        self.num_blocks = num_blocks if num_blocks is not None else parse_bytes(kv_memory) // per_block
        if self.num_blocks < 1:
            raise ValueError(f"kv_memory {kv_memory!r} holds no block of {per_block} bytes")
        self.block_size = block_size
        self.block_manager = BlockManager(self.num_blocks, block_size, enable_prefix_caching)
        self.cache = PagedKVCache.for_model(self.model, self.num_blocks, block_size)
        self.scheduler = Scheduler(self.block_manager, max_batch_tokens, max_num_seqs)
        self.tokenizer = self.model.tokenizer
        self._next_request = 0
        self.requests: dict[int, Request] = {}

    # --- capacity ------------------------------------------------------------
    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def max_concurrent(self, seq_len: int) -> int:
        """How many sequences of ``seq_len`` tokens fit in KV memory at once (no sharing)."""
        return self.num_blocks // self.block_manager.blocks_for(seq_len)

    # --- requests ------------------------------------------------------------
    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    cache_salt: str | None = None) -> int:
        params = params or SamplingParams()
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        request = Request(self._next_request, ids, params, cache_salt=cache_salt)
        self._next_request += 1
        self.requests[request.request_id] = request
        total = len(ids) + params.max_new_tokens
        if not ids:
            request.error = "empty prompt"
        elif any(not 0 <= t < self.config.vocab_size for t in ids):
            request.error = f"prompt has token ids outside the vocabulary [0, {self.config.vocab_size})"
        elif total > self.config.max_positions:
            request.error = (f"prompt ({len(ids)}) + max_new_tokens ({params.max_new_tokens}) exceeds the "
                             f"model's {self.config.max_positions} positions")
        elif self.block_manager.blocks_for(total) > self.num_blocks:
            request.error = (f"request needs {total} tokens of KV but the whole pool holds "
                             f"{self.capacity_tokens} ({self.num_blocks} blocks of {self.block_size})")
        else:
            seq = Sequence(request, ids, 0)
            request.sequences.append(seq)
            self.scheduler.add(seq)
        if request.error:
            request.metrics.finish_time = time.perf_counter()
        return request.request_id

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    # --- the step ------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[Request]:
        """One forward pass; returns the requests that finished in it."""
        batch, copies, rejected = self.scheduler.schedule()
        done = []
        for seq in rejected:
            seq.request.error = "request does not fit in KV memory"
            seq.status = Status.FINISHED
            done.append(seq.request)
        if not batch:
            return done
        self.cache.copy_blocks(copies)
        ids, positions, entries, last = [], [], [], []
        for seq, n in batch:
            start = len(seq.tokens) - n
            ids.extend(seq.tokens[start:])
            positions.extend(range(start, len(seq.tokens)))
            entries.append(BatchEntry(n, len(seq.tokens), self.block_manager.block_table(seq.seq_id)))
            last.append(len(ids) - 1)
        self.cache.prepare(entries)
        logits = self.model(torch.tensor([ids]), torch.tensor([positions]), cache=self.cache,
                            logits_index=torch.tensor(last))
        greedy = logits.argmax(dim=-1).tolist()
        now = time.perf_counter()
        for row, (seq, n) in enumerate(batch):
            seq.num_computed = len(seq.tokens)
            token = greedy[row] if seq.request.params.sampling.greedy else self._sample(logits[row], seq)
            if seq.num_output == 0 and seq.index == 0 and seq.request.metrics.first_token_time is None:
                seq.request.metrics.first_token_time = now
            if seq.index == 0 and len(seq.request.sequences) < seq.request.params.n:
                self._fork_children(seq, list(seq.tokens), logits[row])  # before the parent may finish
            self._emit(seq, token)
        for seq, _ in batch:
            if seq.request.finished and seq.request.metrics.finish_time is None:
                seq.request.metrics.finish_time = now
                done.append(seq.request)
        return done

    def _sample(self, row: torch.Tensor, seq: Sequence) -> int:
        return int(sample(row[None], seq.request.params.sampling, seq.generator)[0])

    def _fork_children(self, parent: Sequence, tokens: list[int], row: torch.Tensor) -> None:
        """Parallel sampling: children share the parent's prefilled blocks (copy-on-write)."""
        request = parent.request
        for index in range(1, request.params.n):
            child = Sequence(request, tokens, index)
            child.num_computed, child.status = len(tokens), Status.RUNNING
            self.block_manager.fork(parent.seq_id, child.seq_id)
            request.sequences.append(child)
            self.scheduler.running.append(child)
            token = int(row.argmax()) if request.params.sampling.greedy else self._sample(row, child)
            self._emit(child, token)

    def _emit(self, seq: Sequence, token: int) -> None:
        seq.append(token)
        params = seq.request.params
        stops = set(params.stop_token_ids or ())
        if not params.ignore_eos:
            stops.update(self.tokenizer.eos_token_ids)
        reason = None
        if token in stops:
            reason = "stop"
        elif params.stop and any(s in self.tokenizer.decode(seq.output_ids) for s in params.stop):
            reason = "stop"
        elif seq.num_output >= params.max_new_tokens or len(seq.tokens) >= self.config.max_positions:
            reason = "length"
        if reason:
            self.scheduler.finish(seq, reason)

    # --- batch API -------------------------------------------------------------
    def generate(self, prompts: Iterable[str | list[int]] | str, params: SamplingParams | list[SamplingParams] | None = None,
                 progress: bool = False) -> list[RequestOutput]:
        """Run prompts to completion together; outputs in prompt order."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        plist = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(plist)} SamplingParams")
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, plist)]
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(ids), desc="requests", unit="req")
        while self.has_unfinished():
            finished = self.step()
            if bar is not None:
                bar.update(len(finished))
        if bar is not None:
            bar.close()
        return [self.output(i) for i in ids]

    def beam_search(self, prompt: str | list[int], beam_width: int, max_new_tokens: int,
                    length_penalty: float = 1.0, stop_token_ids: list[int] | None = None):
        """Beam search over forked sequences in the paged pool (see engine/beam.py); best hypothesis first."""
        from .beam import paged_beam_search

        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        return paged_beam_search(self, ids, beam_width, max_new_tokens, length_penalty, stop_token_ids)

    def output(self, request_id: int) -> RequestOutput:
        r = self.requests.pop(request_id)
        outs = [CompletionOutput(s.index, s.output_ids, self.tokenizer.decode(s.output_ids), s.finish_reason)
                for s in sorted(r.sequences, key=lambda s: s.index)] if r.error is None else []
        return RequestOutput(r.request_id, r.prompt_ids, outs, r.metrics, r.error)

    def stats(self) -> dict:
        """Prefix-cache and memory metrics (tokens and blocks)."""
        b = self.block_manager.stats()
        s = self.scheduler
        return {
            "prefix_query_tokens": b.prefix_query_tokens, "prefix_hit_tokens": b.prefix_hit_tokens,
            "prefix_hit_rate": b.hit_rate, "kv_blocks_total": self.num_blocks, "kv_block_size": self.block_size,
            "kv_capacity_tokens": self.capacity_tokens, "kv_bytes": self.cache.nbytes,
            "kv_blocks_in_use": b.blocks_in_use, "kv_blocks_cached_evictable": b.blocks_cached_evictable,
            "kv_blocks_free": b.blocks_free, "kv_usage_in_use": b.blocks_in_use / self.num_blocks,
            "kv_usage_cached": b.blocks_cached_evictable / self.num_blocks, "evictions": b.evictions,
            "cow_copies": b.cow_copies, "preemptions": s.preemptions, "recomputed_tokens": s.recomputed_tokens,
            "prefill_tokens_computed": s.prefill_tokens,
        }
