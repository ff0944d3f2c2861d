"""One engine replica as a Ray Serve deployment: the same engine thread as ``kvcache serve``, fed by the ingress.

``generate`` is a streaming method: it first yields the replica's id (the request was accepted: queued in the
engine), then lists of the request's deltas as the engine produces them.  A request refused at the door
(``Overloaded``: too many waiting; ``ValueError``: it can never fit) raises before that first item, so the
ingress can answer with a status instead of a broken stream.  Cancelling the stream aborts the engine request.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os

import ray
import torch
from ray import serve

from ..server.app import engine_state_of
from ..server.engine_thread import EngineThread
from ..server.metrics import ServerMetrics
from ..server.serve import build_llm
from .board import PUBLISH_S, find_board
from .job import Job

log = logging.getLogger("ray.serve")


class EngineReplica:
    async def __init__(self, args: argparse.Namespace, model_name: str, app_name: str):
        torch.set_num_threads(max(1, int(args.replica_cpus)))
        self.llm = build_llm(args)
        self.name, self.app_name = model_name, app_name
        self.metrics = ServerMetrics(self.llm, model_name, args.metrics_prefix)
        self.engine = EngineThread(self.llm, self.metrics.on_step, on_change=self.metrics.refresh,
                                   max_waiting=args.max_waiting)
        self.engine.start()
        self.id = serve.get_replica_context().replica_id.unique_id
        self.node = ray.get_runtime_context().get_node_id()
        self._board = None
        self._publisher = asyncio.get_running_loop().create_task(self._publish())
        log.info("kvcache replica %s: %s, %d KV blocks of %d tokens, %d threads", self.id, model_name,
                 self.llm.num_blocks, self.llm.block_size, torch.get_num_threads())

    async def info(self) -> dict:
        """What the ingress needs to check and tokenize requests the way this engine will run them."""
        llm = self.llm
        return {"tokenizer": llm.tokenizer, "context": llm.config.max_positions, "vocab_size": llm.config.vocab_size,
                "capacity_tokens": llm.capacity_tokens}

    async def generate(self, job: Job):
        out: asyncio.Queue = asyncio.Queue()
        request_id = await self.engine.add(job.prompt_ids, job.params, job.salt, out)
        finished = False
        try:
            yield self.id
            while not finished:
                batch = [(await out.get())[1]]
                while not out.empty():
                    batch.append(out.get_nowait()[1])
                finished = any(d.finished for d in batch)
                yield batch
        finally:
            if not finished:  # the ingress cancelled (its client left) or the stream broke
                self.engine.abort(request_id)

    async def record_routing_stats(self) -> dict:
        """Ray Serve polls this for the router: how full the pool is and how many requests wait."""
        s = self.metrics.snapshot
        return {"kv_usage": s["kv_usage_in_use"], "waiting": s["requests_waiting"], "running": s["requests_running"]}

    async def check_health(self) -> None:
        if not self.engine.alive:
            raise RuntimeError("the engine thread stopped")

    async def _publish(self) -> None:
        """Post the page's state and the metrics text to the board, every PUBLISH_S seconds."""
        while True:
            await asyncio.sleep(PUBLISH_S)
            try:
                state = await self.engine.call(lambda llm: engine_state_of(llm, self.metrics, self.name))
                state.update(pid=os.getpid(), node=self.node)
                if self._board is None:
                    self._board = find_board(self.app_name)
                if self._board is not None:
                    self._board.post.remote(self.id, {"state": state, "metrics": self.metrics.render().decode()})
            except Exception as exc:  # the board went away (the ingress restarts): look it up again
                log.debug("kvcache replica %s: posting to the board failed: %r", self.id, exc)
                self._board = None

    def __del__(self):
        """Ray Serve calls this when the replica is stopped: finish the engine and the tiers' queued writes."""
        with contextlib.suppress(Exception):
            self._publisher.cancel()
            self.engine.stop()
            self.llm.close()
