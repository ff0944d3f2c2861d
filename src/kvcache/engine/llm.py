"""``LLM``: the serving engine.  Paged KV memory, prefix caching, continuous batching.

    llm = LLM("path/to/model", kv_memory="1GiB")
    outs = llm.generate(["def fib(n):", "import os"], SamplingParams(max_new_tokens=64))

Each ``step`` asks the scheduler for a batch, flattens its tokens into one
forward pass over the paged cache, samples one token per sequence and
retires finished ones.  Results equal running each request alone.
``kv_cache="int8" | "int4" | spec`` stores the pool quantized (engine/pool.py);
then they equal ``generate(..., cache=llm.kv_cache_spec)``.  Bad input
raises before anything is stored; a step that raises is rolled back (see
``_rollback``), so the engine stays usable.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable
from collections.abc import Sequence as SequenceABC
from pathlib import Path

import torch

from ..caches.paged import BatchEntry
from ..checks import check_int, is_int
from ..generation.generate import check_prompt
from ..generation.sampling import sample
from ..generation.speculative import verify
from ..generation.validation import derived_seed
from ..model.loader import load_model
from ..model.transformer import Transformer
from ..runtime import tune_malloc
from .block_manager import BlockManager
from .outputs import request_deltas, request_output
from .pool import make_pool
from .runner import forward_batch
from .scheduler import Scheduler
from .sequence import Request, RequestDelta, RequestOutput, SamplingParams, Sequence, Status

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "KB": 1 << 10, "KIB": 1 << 10, "M": 1 << 20, "MB": 1 << 20,
          "MIB": 1 << 20, "G": 1 << 30, "GB": 1 << 30, "GIB": 1 << 30, "T": 1 << 40, "TB": 1 << 40, "TIB": 1 << 40}


def parse_bytes(text: str | int) -> int:
    """'2GiB', '512MB', '1.5G' or an int -> bytes (binary units)."""
    if is_int(text):
        return int(text)
    m = re.fullmatch(r"\s*([\d.]+)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).upper() not in _UNITS:
        raise ValueError(f"cannot parse a memory size from {text!r} (examples: '2GiB', '512MB')")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


class UnknownRequestError(LookupError, ValueError):
    """A request id the engine does not hold (never added, aborted, or its output already collected)."""

    def __str__(self) -> str:  # not KeyError's quoted repr
        return str(self.args[0])


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
        pool = make_pool(self.model, kv_cache, budget, num_blocks, block_size, max_num_seqs,
                         lambda block: self.block_manager.ref_count(block) > 0,
                         repr(kv_memory) if num_blocks is None else "")
        self.num_blocks, self.block_size, self.cache = pool.num_blocks, block_size, pool.cache
        self.kv_cache_spec = pool.spec  # generate(..., cache=llm.kv_cache_spec) quantizes exactly as this engine
        self.kv_staging_blocks = pool.staging_blocks
        self.kv_block_bytes = pool.block_bytes  # one block, every layer (quantized: its codes and scales)
        self.window = pool.window  # bounded attention (sliding window, sinks): blocks behind it are released
        self.released_blocks = 0  # blocks given back from behind a window, over all requests
        self.block_manager = BlockManager(self.num_blocks, block_size, enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, max_batch_tokens, max_num_seqs, self.config.max_positions)
        self.tokenizer = self.model.tokenizer  # optional: token-id prompts need none
        self.eos_ids = frozenset(self.tokenizer.eos_token_ids) if self.tokenizer is not None else frozenset()
        self._next_request = 0
        self.spec_drafted = self.spec_accepted = 0  # speculative tokens proposed / kept, over all requests
        self.requests: dict[int, Request] = {}
        self._finished: list[Request] = []  # finished outside a step's own batch, reported by the next step
        self._ended: dict[int, str] = {}  # recent request ids no longer held -> how they ended, for errors
        self._blame: int | None = None  # the request whose tokens a step is handling, if an error comes

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
        ids, params = self._check_request(prompt, params, cache_salt)
        return self._add(ids, params, cache_salt)

    def _check_request(self, prompt, params, cache_salt) -> tuple[list[int], SamplingParams]:
        """The prompt's token ids and the params, validated like the single-stream path."""
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        if cache_salt is not None and not isinstance(cache_salt, str):
            raise TypeError(f"cache_salt must be a str or None, got {cache_salt!r}")
        if params.n > self.scheduler.max_num_seqs:
            raise ValueError(f"n={params.n} exceeds max_num_seqs={self.scheduler.max_num_seqs}: "
                             "its completions could never run together")
        if params.stop and self.tokenizer is None:
            raise ValueError(f"stop strings {list(params.stop)} need a tokenizer, and this model has none: "
                             "use stop_token_ids")
        vocab = self.config.vocab_size
        if any(t >= vocab for t in params.stop_token_ids):
            raise ValueError(f"stop_token_ids {list(params.stop_token_ids)} outside the vocabulary [0, {vocab})")
        return check_prompt(self.model, self._token_ids(prompt), params.max_new_tokens), params

    def _token_ids(self, prompt):
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise TypeError("this model has no tokenizer: pass token ids, not text")
            return self.tokenizer.encode(prompt)
        if isinstance(prompt, (torch.Tensor, SequenceABC)):
            return prompt  # check_prompt takes it from here (and rejects bytes)
        raise TypeError(f"a prompt must be text or a list of token ids, got {type(prompt).__name__}")

    def _add(self, ids: list[int], params: SamplingParams, cache_salt: str | None) -> int:
        request = Request(self._next_request, ids, params, cache_salt=cache_salt)
        self._next_request += 1
        total = len(ids) + params.max_new_tokens
        need = self.block_manager.blocks_for(total)
        if self.window is not None:  # chunks of at most max_batch_tokens, blocks behind the window released
            need = min(need, self.window.blocks_held(self.block_size, self.scheduler.max_batch_tokens))
        if need > self.num_blocks:
            request.error = (f"request needs {total} tokens of KV but the whole pool holds "
                             f"{self.capacity_tokens} ({self.num_blocks} blocks of {self.block_size})")
            self._finish(request, time.perf_counter())
            self._finished.append(request)
        else:
            seq = Sequence(request, ids, 0, self.tokenizer)
            request.sequences.append(seq)
            self.scheduler.add(seq)
        self.requests[request.request_id] = request
        return request.request_id

    def abort_request(self, request_id: int) -> None:
        """Drop a request wherever it is (queued, running or finished) and free its blocks."""
        request = self._request(request_id, "abort")
        del self.requests[request_id]
        self._end(request_id, "aborted")
        for seq in request.sequences:
            self.scheduler.abort(seq)
        self._finished = [r for r in self._finished if r is not request]

    def _request(self, request_id, action: str) -> Request:
        if request_id in self.requests:
            return self.requests[request_id]
        if request_id in self._ended:
            raise UnknownRequestError(f"cannot {action} request {request_id}: it was already {self._ended[request_id]}")
        held = sorted(self.requests)[:8]
        raise UnknownRequestError(f"cannot {action} request {request_id!r}: this engine has no such request "
                                  f"(held now: {held if held else 'none'}{', ...' if len(self.requests) > 8 else ''})")

    def _end(self, request_id: int, how: str) -> None:
        self._ended[request_id] = how
        if len(self._ended) > 10_000:  # remember recent ids only
            del self._ended[next(iter(self._ended))]

    def has_unfinished(self) -> bool:
        """Work left, or finished requests that ``step`` has not reported yet."""
        return self.scheduler.has_work() or bool(self._finished)

    # --- the step ------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[Request]:
        """One forward pass; returns the requests that finished in it (and any finished
        outside a step: rejected when added, or during a step that raised).

        Exception-safe: if the forward pass or sampling raises (even KeyboardInterrupt),
        the step is rolled back (see ``_rollback``) and the exception re-raised.  An error
        raised while handling one request's tokens carries its id as ``exc.request_id``
        (a server fails that request alone)."""
        batch, copies, rejected = self.scheduler.schedule()
        done, self._finished, rngs = self._finished, [], []
        try:
            now = time.perf_counter()
            for seq in rejected:
                seq.request.error = "request does not fit in KV memory"
                seq.status = Status.FINISHED
                self._finish(seq.request, now)
                done.append(seq.request)
            if not batch:
                return done
            rngs = [(seq, len(seq.tokens), seq.generator.get_state()) for seq, _ in batch if seq.generator is not None]
            return done + self._run(batch, copies)
        except BaseException as exc:
            if self._blame is not None:
                try:
                    exc.request_id = self._blame
                except AttributeError:  # an exception type without a __dict__
                    pass
            self._finished = done + self._finished
            self._rollback(batch, rngs)
            raise
        finally:
            self._blame = None

    def _run(self, batch: list[tuple[Sequence, int]], copies) -> list[Request]:
        """Forward the batch, sample and emit a token per sequence; the requests that finished."""
        self.cache.copy_blocks(copies)
        work, work_tables = [], {}
        for seq, n in batch:
            tokens = seq.tokens + seq.draft  # a speculating sequence verifies its draft in the same pass
            start = seq.num_computed  # the next n tokens: a decode token (+ drafts) or a prompt chunk
            work_tables[seq.seq_id] = table = self.block_manager.block_table(seq.seq_id)
            entry = BatchEntry(n, start + n, table, len(seq.draft), self.window)
            work.append((tokens[start:start + n], entry))
        logits = forward_batch(self.model, self.cache, work)
        for seq, n in batch:
            seq.num_computed += n  # every KV of the batch is written now
            table = work_tables[seq.seq_id]  # holes (released blocks) only with bounded attention
            held = len(table) if self.window is None else sum(b is not None for b in table)
            seq.request.metrics.kv_bytes_peak = max(seq.request.metrics.kv_bytes_peak, held * self.kv_block_bytes)
        greedy = logits.argmax(dim=-1).tolist()
        now = time.perf_counter()
        row, still_filling = 0, set()
        for seq, _ in batch:
            rows = 1 + len(seq.draft)  # logits of the last token and of each draft token
            if seq.num_computed < len(seq.tokens):  # a prompt chunk before the last: nothing to sample yet
                row += rows
                continue
            self._blame = seq.request.request_id  # an error from here on is this request's
            new = self._accept(seq, logits[row:row + rows], still_filling) if seq.draft else [
                greedy[row] if seq.request.params.sampling.greedy else self._sample(logits[row], seq)]
            if seq.num_output:
                seq.request.metrics.decode_passes += 1
            elif seq.index == 0 and seq.request.metrics.first_token_time is None:
                seq.request.metrics.first_token_time = now
            if seq.index == 0 and len(seq.request.sequences) < seq.request.params.n:
                self._fork_children(seq, list(seq.tokens), logits[row + rows - 1])  # before the parent may finish
            for token in new:
                self._emit(seq, token)
                if seq.status is Status.FINISHED:
                    break
            row += rows
        self._blame = None
        self.cache.settle(still_filling)
        if self.window is not None:
            self._release_behind_window(batch)
        done = []
        for seq, _ in batch:
            if seq.request.finished and seq.request.metrics.finish_time is None:
                self._finish(seq.request, now)
                done.append(seq.request)
        return done

    def _release_behind_window(self, batch: list[tuple[Sequence, int]]) -> None:
        """Give back each running sequence's blocks no later query reads (behind the window, past the sinks);
        a full one stays in the prefix cache, whose KV it still is."""
        for seq, _ in batch:
            if seq.status is Status.RUNNING:
                blocks = self.block_manager.blocks_for(self.block_manager.num_tokens(seq.seq_id))
                first, stop = self.window.releasable(seq.num_computed, self.block_size, blocks)
                released = self.block_manager.release(seq.seq_id, first, stop) if stop > first else 0
                seq.request.metrics.released_blocks += released
                self.released_blocks += released

    def _accept(self, seq: Sequence, logits: torch.Tensor, still_filling: set[int]) -> list[int]:
        """Verify ``seq``'s draft: the kept drafts and the token after them.  Rejected drafts leave the block
        manager (and with it the prefix cache); a block the rollback leaves partial is still being filled."""
        draft = seq.draft
        kept, extra = verify(logits, draft, None, seq.request.params.sampling, seq.generator)
        keep = len(seq.tokens) + kept
        self.block_manager.truncate(seq.seq_id, keep)
        seq.num_computed, seq.draft = keep, []
        if keep % self.block_size:
            still_filling.add(self.block_manager.block_table(seq.seq_id)[-1])
        metrics = seq.request.metrics
        metrics.drafted_tokens += len(draft)
        metrics.accepted_tokens += kept
        self.spec_drafted += len(draft)
        self.spec_accepted += kept
        return draft[:kept] + [extra]

    def _rollback(self, batch: list[tuple[Sequence, int]], rngs) -> None:
        """Undo a step that raised.  Every running sequence (the batch and children forked in
        it) is preempted back to waiting, keeping the tokens it has: a later step recomputes
        its KV.  Blocks the forward pass never wrote leave the prefix cache (``preempt`` frees
        from ``num_computed``).  A seeded generator that drew a token not appended is rewound,
        so the redone step draws it again."""
        for seq, length, state in rngs:
            if len(seq.tokens) == length:
                seq.generator.set_state(state)
        for seq in reversed(list(self.scheduler.running)):  # reversed: they keep their order at the front
            if seq.num_output == 0 and seq.generator is not None:  # a child forked in this step
                seq.generator.manual_seed(derived_seed(seq.request.params.seed, seq.index))
            self.scheduler.preempt(seq)
        now = time.perf_counter()
        for request in {seq.request.request_id: seq.request for seq, _ in batch}.values():
            if request.finished and request.metrics.finish_time is None:  # finished before the error
                self._finish(request, now)
                self._finished.append(request)

    def _finish(self, request: Request, now: float) -> None:
        m = request.metrics
        m.finish_time = now
        m.num_output_tokens = sum(s.num_output for s in request.sequences)
        m.num_completions = len(request.sequences)

    def _sample(self, row: torch.Tensor, seq: Sequence) -> int:
        return int(sample(row[None], seq.request.params.sampling, seq.generator)[0])

    def _fork_children(self, parent: Sequence, tokens: list[int], row: torch.Tensor) -> None:
        """Parallel sampling: children share the parent's prefilled blocks (copy-on-write)."""
        request = parent.request
        for index in range(1, request.params.n):
            child = Sequence(request, tokens, index, self.tokenizer)
            child.num_computed, child.status = len(tokens), Status.RUNNING
            self.block_manager.fork(parent.seq_id, child.seq_id)
            request.sequences.append(child)
            self.scheduler.running.append(child)
            token = int(row.argmax()) if request.params.sampling.greedy else self._sample(row, child)
            self._emit(child, token)

    def _emit(self, seq: Sequence, token: int) -> None:
        """Append ``token``; finish ``seq`` if it must stop.  The decision is made before
        anything changes, so an error in it leaves the sequence as it was.  A stop token's
        text is left out of the output, as is a stop string's (vLLM does the same)."""
        params = seq.request.params
        reason, piece = None, None
        if token in params.stop_token_ids or (not params.ignore_eos and token in self.eos_ids):
            reason = "stop"
        elif seq.detokenizer is not None:
            piece = seq.detokenizer.preview(token)
            reason = "stop" if piece.stop_at is not None else None
        if reason is None and (seq.num_output + 1 >= params.max_new_tokens
                               or len(seq.tokens) + 1 >= self.config.max_positions):
            reason = "length"
        seq.append(token)
        if piece is not None:
            seq.detokenizer.commit(token, piece)
        if reason:
            if seq.detokenizer is not None:
                seq.detokenizer.flush()
            self.scheduler.finish(seq, reason)

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
                checked.append(self._check_request(prompt, sp, None))
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"prompt {i}: {exc}") from exc
        ids = [self._add(p, sp, None) for p, sp in checked]
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
            self._finished += others

    def _step_aside(self) -> None:
        """A step run on someone else's behalf (beam search waiting for memory): the requests
        it finishes are reported by the caller's next ``step``."""
        self._finished += self.step()

    def beam_search(self, prompt: str | list[int], beam_width: int, max_new_tokens: int,
                    length_penalty: float = 1.0, stop_token_ids: list[int] | None = None):
        """Beam search over forked sequences in the paged pool (see engine/beam.py); best hypothesis first."""
        from .beam import paged_beam_search

        return paged_beam_search(self, self._token_ids(prompt), beam_width, max_new_tokens, length_penalty,
                                 stop_token_ids)

    def output(self, request_id: int) -> RequestOutput:
        """A finished request's result; removes it from ``requests``."""
        r = self._request(request_id, "collect the output of")
        if not r.finished:
            raise ValueError(f"request {request_id} is not finished: step until it is, or abort_request it")
        del self.requests[request_id]
        self._end(request_id, "collected (its output was returned)")
        return request_output(r)

    def step_deltas(self) -> list[RequestDelta]:
        """``step``, reported as what each request gained: new token ids and text per completion, the finish
        reason with a completion's last delta (for streaming).  A finished request stays held until
        ``output`` collects it (or ``abort_request`` drops it)."""
        self.step()
        return request_deltas(self.requests.values())

    def stats(self) -> dict:
        """Prefix-cache and memory metrics (tokens and blocks)."""
        b = self.block_manager.stats()
        s = self.scheduler
        return {
            "prefix_query_tokens": b.prefix_query_tokens, "prefix_hit_tokens": b.prefix_hit_tokens,
            "prefix_hit_rate": b.hit_rate, "kv_blocks_total": self.num_blocks, "kv_block_size": self.block_size,
            "kv_capacity_tokens": self.capacity_tokens, "kv_bytes": self.cache.nbytes,
            "kv_cache": self.kv_cache_spec, "kv_staging_blocks": self.kv_staging_blocks,
            "kv_blocks_in_use": b.blocks_in_use, "kv_blocks_cached_evictable": b.blocks_cached_evictable,
            "kv_blocks_free": b.blocks_free, "kv_usage_in_use": b.blocks_in_use / self.num_blocks,
            "kv_usage_cached": b.blocks_cached_evictable / self.num_blocks, "evictions": b.evictions,
            "cow_copies": b.cow_copies, "preemptions": s.preemptions, "recomputed_tokens": s.recomputed_tokens,
            "prefill_tokens_computed": s.prefill_tokens, "window_released_blocks": self.released_blocks,
            "spec_drafted_tokens": self.spec_drafted, "spec_accepted_tokens": self.spec_accepted,
            "spec_acceptance_rate": self.spec_accepted / self.spec_drafted if self.spec_drafted else 0.0,
        }
