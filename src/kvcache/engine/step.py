"""One engine step: schedule, forward, sample, emit; and what a step that raises leaves behind (nothing).

Each step asks the scheduler for a batch, runs it through the model (model_runner.py), appends a token to
every sequence whose prompt is done (stop_rules.py), releases blocks behind a window, and reports the
requests that finished.  If the forward pass or sampling raises, even ``KeyboardInterrupt``, the step is
rolled back: its sequences return to waiting with the tokens they have, and seeded generators rewind.
"""

from __future__ import annotations

import time

import torch

from ..generation.validation import derived_seed
from .outputs import finish_metrics
from .sequence import Request, Sequence, Status


class Stepper:
    def __init__(self, registry, scheduler, block_manager, pool, runner, stops):
        self.registry, self.scheduler, self.block_manager = registry, scheduler, block_manager
        self.pool, self.runner, self.stops = pool, runner, stops
        self.released_blocks = 0  # blocks given back from behind a window, over all requests
        self._blame: int | None = None  # the request whose tokens a step is handling, if an error comes

    @torch.inference_mode()
    def step(self) -> list[Request]:
        """One forward pass; the requests that finished in it (and any finished outside a step).  An error
        raised while handling one request's tokens carries its id as ``exc.request_id``."""
        batch, copies, rejected = self.scheduler.schedule()
        done, self.registry.unreported, rngs = self.registry.unreported, [], []
        try:
            now = time.perf_counter()
            for seq in rejected:
                seq.request.error = "request does not fit in KV memory"
                seq.status = Status.FINISHED
                finish_metrics(seq.request, now)
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
            self.registry.unreported = done + self.registry.unreported
            self._rollback(batch, rngs)
            raise
        finally:
            self._blame = None

    def _run(self, batch: list[tuple[Sequence, int]], copies) -> list[Request]:
        """Forward the batch, sample and emit a token per sequence; the requests that finished."""
        self.pool.copy_blocks(copies)
        logits, tables = self.runner.forward(batch)
        for seq, n in batch:
            seq.num_computed += n  # every KV of the batch is written now
            table = tables[seq.seq_id]  # holes (released blocks) only with bounded attention
            held = len(table) if self.pool.window is None else sum(b is not None for b in table)
            metrics = seq.request.metrics
            metrics.kv_bytes_peak = max(metrics.kv_bytes_peak, held * self.pool.block_bytes)
        greedy = logits.argmax(dim=-1).tolist()
        now = time.perf_counter()
        row, still_filling = 0, set()
        for seq, _ in batch:
            rows = 1 + len(seq.draft)  # logits of the last token and of each draft token
            if seq.num_computed < len(seq.tokens):  # a prompt chunk before the last: nothing to sample yet
                row += rows
                continue
            self._blame = seq.request.request_id  # an error from here on is this request's
            new = self.runner.accept(seq, logits[row:row + rows], still_filling) if seq.draft else [
                greedy[row] if seq.request.params.sampling.greedy else self.runner.sample(logits[row], seq)]
            if seq.num_output:
                seq.request.metrics.decode_passes += 1
            elif seq.index == 0 and seq.request.metrics.first_token_time is None:
                seq.request.metrics.first_token_time = now
            if seq.index == 0 and len(seq.request.sequences) < seq.request.params.n:  # before the parent may finish
                self.runner.fork_children(seq, logits[row + rows - 1], self.stops.emit)
            for token in new:
                self.stops.emit(seq, token)
                if seq.status is Status.FINISHED:
                    break
            row += rows
        self._blame = None
        self.pool.settle(still_filling)
        if self.scheduler.tiers is not None:  # before the window releases blocks: their KV is still there
            self.scheduler.tiers.save(batch, tables)
        if self.pool.window is not None:
            self._release_behind_window(batch)
        done = []
        for seq, _ in batch:
            if seq.request.finished and seq.request.metrics.finish_time is None:
                finish_metrics(seq.request, now)
                done.append(seq.request)
        return done

    def _release_behind_window(self, batch: list[tuple[Sequence, int]]) -> None:
        """Give back each running sequence's blocks no later query reads (behind the window, past the sinks);
        a full one stays in the prefix cache, whose KV it still is."""
        bm = self.block_manager
        for seq, _ in batch:
            if seq.status is Status.RUNNING:
                blocks = bm.blocks_for(bm.num_tokens(seq.seq_id))
                first, stop = self.pool.window.releasable(seq.num_computed, bm.block_size, blocks)
                released = bm.release(seq.seq_id, first, stop) if stop > first else 0
                seq.request.metrics.released_blocks += released
                self.released_blocks += released

    def _rollback(self, batch: list[tuple[Sequence, int]], rngs) -> None:
        """Undo a step that raised.  Every running sequence (the batch and children forked in it) is
        preempted back to waiting, keeping the tokens it has: a later step recomputes its KV.  Blocks the
        forward pass never wrote leave the prefix cache (``preempt`` frees from ``num_computed``).  A seeded
        generator that drew a token not appended is rewound, so the redone step draws it again."""
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
                finish_metrics(request, now)
                self.registry.unreported.append(request)
