"""The ingress deployment: OpenAI's HTTP API (``server/api.py``, the same code as ``kvcache serve``) in front of
the engine replicas, reached through a Serve handle whose router picks the replica.

A prompt that has not streamed anything yet when its replica fails (killed, unreachable) is sent again, to
another replica; one that has streamed gets an error (500 body, or an error event in the stream).  A replica that
refuses a request because its queue is full makes a 429; more prompts waiting for a replica than the bound make a
503; both with Retry-After.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily
from ray import serve
from ray.exceptions import RayActorError, RayTaskError, TaskCancelledError, WorkerCrashedError
from ray.serve.exceptions import DeploymentUnavailableError, ReplicaUnavailableError

from ..engine.sequence import RequestDelta, RequestMetrics, SamplingParams
from ..server.api import OpenAIApi, QueuedRun, add_api_routes, add_error_handlers
from ..server.app import add_page, overloaded_error
from ..server.engine_thread import Overloaded
from ..server.protocol import OpenAIError
from .board import MergedMetrics, open_board
from .job import Job
from .router import decisions

log = logging.getLogger("ray.serve")
RETRIES = 3  # times a prompt that streamed nothing is sent again after its replica failed
RETRY_PAUSE_S = 0.25  # before resending: the handle learns of the dead replica meanwhile
_REPLICA_FAILURES = (RayActorError, WorkerCrashedError, ReplicaUnavailableError, DeploymentUnavailableError)


class ReplicaFailed(Exception):
    pass


def refusal(exc: BaseException) -> OpenAIError | None:
    """The HTTP answer for a request the replicas refused, or None if the replica failed (worth a retry)."""
    if isinstance(exc, RayTaskError):
        cause = exc.cause
        if isinstance(cause, Overloaded):
            return overloaded_error(cause)
        if isinstance(cause, (TypeError, ValueError)):
            return OpenAIError(str(cause))
        return OpenAIError(f"the request failed inside the engine: {cause!r}", 500, kind="internal_server_error")
    if isinstance(exc, _REPLICA_FAILURES):
        return None
    return OpenAIError(f"the request failed: {exc!r}", 500, kind="internal_server_error")


class ReplicaBackend:
    """The engine replicas behind the handle, for ``OpenAIApi``."""

    def __init__(self, handle, info: dict, max_queued: int):
        self.handle = handle.options(stream=True)
        self.max_queued, self.queued = max_queued, 0  # prompts sent but not yet accepted by a replica
        self.tokenizer, self.context = info["tokenizer"], info["context"]
        self.vocab_size, self.capacity_tokens = info["vocab_size"], info["capacity_tokens"]
        self.counts: Counter = Counter()  # retries, replica_failures, failed, refused_429, refused_503

    def run(self) -> ReplicaRun:
        return ReplicaRun(self)

    def failed(self) -> None:
        self.counts["failed"] += 1

    async def start(self, job: Job):
        """A stream the replica accepted; resent to another replica if the first one failed."""
        if self.queued >= self.max_queued:  # more than every replica can take, plus the ingress's queue
            self.counts["refused_503"] += 1
            raise OpenAIError(f"the server is overloaded: {self.queued} requests are waiting for a replica; retry "
                              "later", 503, code="overloaded", kind="server_error", headers={"Retry-After": "1"})
        self.queued += 1
        try:
            return await self._start(job)
        finally:
            self.queued -= 1

    async def _start(self, job: Job):
        last: BaseException | None = None
        for attempt in range(RETRIES + 1):
            if attempt:
                self.counts["retries"] += 1
                await asyncio.sleep(RETRY_PAUSE_S)
            stream = None
            try:
                stream = self.handle.generate.remote(job)  # a full handle queue raises here, not on the first item
                await stream.__anext__()  # the replica's id: accepted
                return stream
            except (asyncio.CancelledError, GeneratorExit):
                if stream is not None:
                    stream.cancel()
                raise
            except Exception as exc:
                if stream is not None:
                    stream.cancel()
                error = refusal(exc)
                if error is not None:
                    self.counts[f"refused_{error.status}"] += 1
                    raise error from None
                self.counts["replica_failures"] += 1
                log.warning("kvcache ingress: a replica failed before answering (%r); sending elsewhere", exc)
                last = exc
        self.counts["refused_503"] += 1
        raise OpenAIError(f"no replica could take the request ({RETRIES + 1} tries; last: {last!r})", 503,
                          code="replica_unavailable", kind="server_error", headers={"Retry-After": "1"})


class ReplicaRun(QueuedRun):
    """The prompts of one HTTP request, each streamed from the replica the router chose."""

    def __init__(self, backend: ReplicaBackend):
        super().__init__()
        self.backend, self.tasks = backend, []

    async def add(self, prompts: list[list[int]], params: SamplingParams, salt: str | None) -> None:
        try:
            for tag, ids in enumerate(prompts):
                job = Job(list(ids), params, salt)
                stream = await self.backend.start(job)
                self.open.add(tag)
                self.tasks.append(asyncio.create_task(self._pump(tag, job, stream)))
        except BaseException:
            self.close()
            raise

    async def _pump(self, tag: int, job: Job, stream) -> None:
        delivered = finished = False
        try:
            while True:
                try:
                    # Read the stream to its end, past the finished delta: only a completed stream makes the
                    # handle count the request as done (its queue-length cache, which the router reads).
                    async for batch in stream:
                        for delta in batch:
                            delivered = True
                            finished = finished or delta.finished
                            self.out.put_nowait((tag, delta))
                    if finished:
                        return
                    raise ReplicaFailed("the replica's stream ended before the request finished")
                except (asyncio.CancelledError, TaskCancelledError):
                    raise
                except Exception as exc:
                    if delivered or refusal(exc) is not None:
                        raise
                    self.backend.counts["replica_failures"] += 1
                    log.warning("kvcache ingress: a replica failed before the first token (%r); resending", exc)
                    stream = await self.backend.start(job)  # nothing was streamed: start again elsewhere
        except (asyncio.CancelledError, TaskCancelledError):
            stream.cancel()
            raise
        except Exception as exc:
            if isinstance(exc, _REPLICA_FAILURES) or isinstance(exc, ReplicaFailed):
                self.backend.counts["replica_failures"] += 1
                message = f"the replica serving this request failed: {type(exc).__name__}"
            else:
                message = str(exc) if isinstance(exc, OpenAIError) else f"the request failed: {exc!r}"
            self.out.put_nowait((tag, RequestDelta(-1, [], True, RequestMetrics(time.perf_counter()), message)))

    def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        self.open = set()


@serve.ingress()
class Ingress:
    async def __init__(self, engine, model_name: str, app_name: str, metrics_prefix: str = "kvcache",
                       max_queued: int = 512):
        self.name = model_name
        self.board = open_board(app_name)
        info = await engine.info.remote()
        self.chat = bool(info["tokenizer"] is not None and info["tokenizer"].chat_template)
        self.backend = ReplicaBackend(engine, info, max_queued)
        self.merged = MergedMetrics()
        self.registry = CollectorRegistry()
        self.registry.register(self.merged)
        self.registry.register(_IngressCounters(self.backend, metrics_prefix, model_name))

    def __serve_build_asgi_app__(self) -> FastAPI:
        app = FastAPI(title="kvcache (replicas)")
        add_error_handlers(app, log)
        add_api_routes(app, OpenAIApi(self.backend, self.name))
        app.get("/health")(self.health)
        app.get("/metrics")(self.metrics)
        app.get("/engine/state")(self.engine_state)
        add_page(app)
        return app

    async def _posts(self) -> dict[str, dict]:
        return await self.board.read.remote()

    async def health(self):
        posts = await self._posts()
        if not posts:
            return JSONResponse({"status": "no replica is serving"}, status_code=503)
        return {"status": "ok", "replicas": len(posts)}

    async def metrics(self):
        self.merged.texts = {r: p["metrics"] for r, p in (await self._posts()).items()}
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)

    async def engine_state(self):
        """The page's state: every replica's pool, and the counters summed over replicas."""
        replicas = [{**p["state"], "replica": r} for r, p in (await self._posts()).items()]
        total = {k: sum(s[k] for s in replicas) for k in ("requests_running", "requests_waiting",
                                                           "generation_tokens", "prefix_query_tokens",
                                                           "prefix_hit_tokens")}
        hit_rate = total["prefix_hit_tokens"] / total["prefix_query_tokens"] if total["prefix_query_tokens"] else 0.0
        return {**total, "prefix_hit_rate": hit_rate, "time": time.time(), "model": self.name, "chat": self.chat,
                "kv_cache": replicas[0]["kv_cache"] if replicas else "-",
                "blocks": "".join(s["blocks"] for s in replicas), "replicas": replicas}


class _IngressCounters:
    """The ingress's own counters: routing decisions per replica, resends, failures and refusals."""

    def __init__(self, backend: ReplicaBackend, prefix: str, model_name: str):
        self.backend, self.p, self.model = backend, prefix + ":", model_name

    def collect(self):
        routed = CounterMetricFamily(self.p + "router_requests", "Requests routed, by router, reason and replica.",
                                     labels=["model_name", "router", "reason", "replica"])
        for (router, reason, replica), n in sorted(decisions().items()):
            routed.add_metric([self.model, router, reason, replica], n)
        yield routed
        for name, text in [("failed", "Requests that failed after they started (a 500 body or an error event)."),
                           ("retries", "Prompts resent to another replica after theirs failed."),
                           ("replica_failures", "Replica calls that failed (died, unreachable)."),
                           ("refused_429", "Requests refused because a replica's queue was full."),
                           ("refused_503", "Requests refused because every queue was full or no replica was up.")]:
            family = CounterMetricFamily(self.p + "ingress_" + name, text, labels=["model_name"])
            family.add_metric([self.model], self.backend.counts[name])
            yield family
