"""``LLM``: the serving engine's front door.  Paged KV memory, prefix caching, continuous batching.

    llm = LLM("path/to/model", kv_memory="1GiB")
    outs = llm.generate(["def fib(n):", "import os"], SamplingParams(max_new_tokens=64))

Each ``step`` asks the scheduler for a batch, flattens its tokens into one forward pass over the paged
pool, samples one token per sequence and retires finished ones (step.py).  Results equal running each
request alone.  ``kv_cache="int8" | "int4" | spec`` picks the pool (engine/pool.py); then they equal
``generate(..., cache=llm.kv_cache_spec)``.  Bad input raises before anything is stored (requests.py); a
step that raises is rolled back, so the engine stays usable.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

from ..checks import check_int, is_int
from ..model.loader import load_model
from ..model.transformer import Transformer
from ..runtime import tune_malloc
from ..tiers import KVTiers
from .block_manager import BlockManager
from .model_runner import ModelRunner
from .outputs import request_deltas, request_output
from .pool import make_pool
from .requests import RequestRegistry, UnknownRequestError, parse_bytes
from .scheduler import Scheduler
from .sequence import Request, RequestDelta, RequestOutput, SamplingParams
from .step import Stepper
from .stop_rules import StopRules
from .tiering import TierLink

__all__ = ["LLM", "UnknownRequestError", "parse_bytes"]


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
        kv_cache: str | None = None,
        kv_tiers: KVTiers | None = None,
    ):
        for name, value in (("block_size", block_size), ("max_batch_tokens", max_batch_tokens),
                            ("max_num_seqs", max_num_seqs), ("num_blocks", num_blocks)):
            if value is not None or name != "num_blocks":
                check_int(value, name, minimum=1)
        tune_malloc()  # an engine owns its process: reuse freed activation memory (kvcache/runtime.py)
        self.model = model if isinstance(model, Transformer) else load_model(model)
        self.config = self.model.config
        self.model.pack_weights()  # load_model packs already; a model built otherwise is packed here
        budget = parse_bytes(kv_memory) if num_blocks is None else None
        self.cache = make_pool(self.model, kv_cache, budget, num_blocks, block_size, max_num_seqs,
                               lambda block: self.block_manager.ref_count(block) > 0,
                               repr(kv_memory) if num_blocks is None else "")
        self.num_blocks, self.block_size = self.cache.num_blocks, block_size
        self.kv_cache_spec = self.cache.spec  # generate(..., cache=llm.kv_cache_spec) gives this engine's tokens
        self.kv_staging_blocks = self.cache.staging_blocks
        self.kv_block_bytes = self.cache.block_bytes  # one block, every layer (quantized: its codes and scales)
        self.window = self.cache.window  # bounded attention (sliding window, sinks): blocks behind it are released
        self.block_manager = BlockManager(self.num_blocks, block_size, enable_prefix_caching)
        self.kv_tiers = kv_tiers  # stores behind the pool (kvcache/tiers): a pool miss may still find KV there
        link = None
        if kv_tiers is not None:
            kv_tiers.bind(self.model, self.cache)
            link = TierLink(kv_tiers, self.block_manager, self.cache)
        self.scheduler = Scheduler(self.block_manager, max_batch_tokens, max_num_seqs, self.config.max_positions,
                                   link)
        self.tokenizer = self.model.tokenizer  # optional: token-id prompts need none
        eos_ids = frozenset(self.tokenizer.eos_token_ids) if self.tokenizer is not None else frozenset()
        self.registry = RequestRegistry(self.model, self.scheduler, self.block_manager, self.window, self.tokenizer)
        self.requests: dict[int, Request] = self.registry.requests
        self.stop_rules = StopRules(self.scheduler, eos_ids, self.config.max_positions)
        self.runner = ModelRunner(self.model, self.cache, self.block_manager, self.scheduler, self.tokenizer)
        self.stepper = Stepper(self.registry, self.scheduler, self.block_manager, self.cache, self.runner,
                               self.stop_rules)

    # --- capacity ------------------------------------------------------------
    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def max_concurrent(self, seq_len: int) -> int:
        """How many sequences of ``seq_len`` tokens fit in KV memory at once (no sharing; a quantized pool also
        needs a staging block per sequence)."""
        fit = self.num_blocks // self.block_manager.blocks_for(seq_len)
        return min(fit, self.kv_staging_blocks) if self.kv_staging_blocks else fit

    # --- requests ------------------------------------------------------------
    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    cache_salt: str | None = None) -> int:
        """Queue a prompt; returns its request id.  Bad input raises before anything is stored.
        A request too big for the whole KV pool is kept with ``error`` set, finished at once
        (the next ``step`` reports it)."""
        ids, params = self.registry.check(prompt, params, cache_salt)
        return self.registry.add(ids, params, cache_salt)

    def abort_request(self, request_id: int) -> None:
        """Drop a request wherever it is (queued, running or finished) and free its blocks."""
        self.registry.abort(request_id)

    def request_counts(self) -> tuple[int, int]:
        """Requests (not sequences) in the running batch, and those waiting with no sequence running."""
        running = {s.request.request_id for s in self.scheduler.running}
        return len(running), len({s.request.request_id for s in self.scheduler.waiting} - running)

    def has_unfinished(self) -> bool:
        """Work left, or finished requests that ``step`` has not reported yet."""
        return self.scheduler.has_work() or bool(self.registry.unreported)

    def step(self) -> list[Request]:
        """One forward pass; returns the requests that finished in it (and any finished
        outside a step: rejected when added, or during a step that raised).

        Exception-safe: if the forward pass or sampling raises (even KeyboardInterrupt),
        the step is rolled back (engine/step.py) and the exception re-raised.  An error
        raised while handling one request's tokens carries its id as ``exc.request_id``
        (a server fails that request alone)."""
        return self.stepper.step()

    # --- batch API -------------------------------------------------------------
    def generate(self, prompts: Iterable[str | list[int]] | str,
                 params: SamplingParams | list[SamplingParams] | None = None,
                 progress: bool = False) -> list[RequestOutput]:
        """Run prompts to completion together; outputs in prompt order.

        All or nothing: every prompt and params is checked before any is queued, and if the
        run raises (e.g. KeyboardInterrupt) its requests are aborted, so none is left behind."""
        if isinstance(prompts, str) or (isinstance(prompts, torch.Tensor) and prompts.dim() == 1) or (
                isinstance(prompts, list) and prompts and is_int(prompts[0])):
            prompts = [prompts]
        prompts = list(prompts)
        plist = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(plist)} SamplingParams")
        checked = []
        for i, (prompt, sp) in enumerate(zip(prompts, plist)):
            try:
                checked.append(self.registry.check(prompt, sp, None))
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"prompt {i}: {exc}") from exc
        ids = [self.registry.add(p, sp, None) for p, sp in checked]
        try:
            self._run_to_completion(set(ids), progress)
        except BaseException:
            for i in ids:
                if i in self.requests:
                    self.abort_request(i)
            raise
        return [self.output(i) for i in ids]

    def chat(self, messages: list[dict] | list[list[dict]], params: SamplingParams | list[SamplingParams] | None = None,
             progress: bool = False) -> list[RequestOutput]:
        """One conversation (a list of {'role', 'content'} dicts) or several, each rendered with the model's
        chat template and answered as the assistant's next message.  Conversations that share a history
        share its KV through the prefix cache."""
        if self.tokenizer is None or not self.tokenizer.chat_template:
            raise ValueError("this model has no chat template: chat needs an instruction-tuned model")
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = []
        for i, conversation in enumerate(conversations):
            try:
                prompts.append(self.tokenizer.apply_chat_template(conversation, add_generation_prompt=True))
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"conversation {i}: {exc}") from exc
        return self.generate(prompts, params, progress)

    def _run_to_completion(self, own: set[int], progress: bool) -> None:
        """Step until no work is left.  Requests added outside this call that finish meanwhile
        are handed back to the next ``step`` to report."""
        others: list[Request] = []
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(own), desc="requests", unit="req")
        try:
            while self.has_unfinished():
                finished = self.step()
                mine = [r for r in finished if r.request_id in own]
                others += [r for r in finished if r.request_id not in own]
                if bar is not None:
                    bar.update(len(mine))
        finally:
            if bar is not None:
                bar.close()
            self.registry.unreported += others

    def _step_aside(self) -> None:
        """A step run on someone else's behalf (beam search waiting for memory): the requests
        it finishes are reported by the caller's next ``step``."""
        self.registry.unreported += self.step()

    def beam_search(self, prompt: str | list[int], beam_width: int, max_new_tokens: int,
                    length_penalty: float = 1.0, stop_token_ids: list[int] | None = None):
        """Beam search over forked sequences in the paged pool (see engine/paged_beam.py); best hypothesis first."""
        from .paged_beam import paged_beam_search

        return paged_beam_search(self, self.registry.token_ids(prompt), beam_width, max_new_tokens, length_penalty,
                                 stop_token_ids)

    def output(self, request_id: int) -> RequestOutput:
        """A finished request's result; removes it from ``requests``."""
        return request_output(self.registry.collect(request_id))

    def step_deltas(self) -> list[RequestDelta]:
        """``step``, reported as what each request gained: new token ids and text per completion, the finish
        reason with a completion's last delta (for streaming).  A finished request stays held until
        ``output`` collects it (or ``abort_request`` drops it)."""
        self.step()
        return request_deltas(self.requests.values())

    def stats(self) -> dict:
        """Prefix-cache and memory metrics (tokens and blocks)."""
        b = self.block_manager.stats()
        s, r = self.scheduler, self.runner
        return {
            "prefix_query_tokens": b.prefix_query_tokens, "prefix_hit_tokens": b.prefix_hit_tokens,
            "prefix_hit_rate": b.hit_rate, "kv_blocks_total": self.num_blocks, "kv_block_size": self.block_size,
            "kv_capacity_tokens": self.capacity_tokens, "kv_bytes": self.cache.nbytes,
            "kv_cache": self.kv_cache_spec, "kv_staging_blocks": self.kv_staging_blocks,
            "kv_blocks_in_use": b.blocks_in_use, "kv_blocks_cached_evictable": b.blocks_cached_evictable,
            "kv_blocks_free": b.blocks_free, "kv_usage_in_use": b.blocks_in_use / self.num_blocks,
            "kv_usage_cached": b.blocks_cached_evictable / self.num_blocks, "evictions": b.evictions,
            "cow_copies": b.cow_copies, "preemptions": s.preemptions, "recomputed_tokens": s.recomputed_tokens,
            "prefill_tokens_computed": s.prefill_tokens, "window_released_blocks": self.stepper.released_blocks,
            "spec_drafted_tokens": r.drafted, "spec_accepted_tokens": r.accepted,
            "spec_acceptance_rate": r.accepted / r.drafted if r.drafted else 0.0,
            "tier_loaded_tokens": s.tiers.loaded_tokens if s.tiers is not None else 0,
            "kv_tiers": self.kv_tiers.stats() if self.kv_tiers is not None else None,
        }

    def close(self) -> None:
        """Finish the KV tiers' queued writes and close their stores (the engine itself holds nothing else)."""
        if self.kv_tiers is not None:
            self.kv_tiers.close()
