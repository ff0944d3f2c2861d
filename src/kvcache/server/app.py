"""The HTTP server over one engine in this process: OpenAI's endpoints (``api.py``), metrics, the page.

FastAPI (pydantic bodies, exception handlers) on uvicorn: the stack vLLM and SGLang serve with, so clients,
proxies and habits carry over.  Every handler runs on the event loop; the engine runs on its own thread
(``engine_thread.py``) and streams deltas back.  A client that goes away aborts its requests.
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from importlib import resources

from fastapi import FastAPI
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from ..engine.llm import LLM
from ..engine.sequence import SamplingParams
from .api import OpenAIApi, QueuedRun, add_api_routes, add_error_handlers
from .engine_thread import EngineThread, Overloaded
from .metrics import ServerMetrics, llm_snapshot
from .protocol import OpenAIError

log = logging.getLogger("kvcache.server")


def build_app(llm: LLM, model_name: str, metrics_prefix: str = "kvcache", max_waiting: int | None = None) -> FastAPI:
    metrics = ServerMetrics(llm, model_name, metrics_prefix)
    engine = EngineThread(llm, metrics.on_step, on_change=metrics.refresh, max_waiting=max_waiting)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            engine.stop()
            llm.close()  # the KV tiers' queued writes land before the process exits

    app = FastAPI(title="kvcache", lifespan=lifespan)
    app.state.engine, app.state.metrics, app.state.llm = engine, metrics, llm
    add_error_handlers(app, log)
    add_api_routes(app, OpenAIApi(LocalBackend(llm, engine, metrics), model_name))

    @app.get("/health")
    async def health():
        if not engine.alive:
            return JSONResponse({"status": "engine stopped"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/engine/state")
    async def engine_state():
        return await engine.call(lambda llm: engine_state_of(llm, metrics, model_name))

    add_page(app)
    return app


def engine_state_of(llm: LLM, metrics: ServerMetrics, model_name: str) -> dict:
    """What the page draws: the pool block by block ('u' in use, 'c' cached, 'f' free) and the counters.
    Runs on the engine thread."""
    return {**llm_snapshot(llm), "blocks": llm.block_manager.block_states(),
            "generation_tokens": metrics.total_generated, "model": model_name,
            "chat": bool(llm.tokenizer is not None and llm.tokenizer.chat_template)}


def add_page(app: FastAPI) -> None:
    page = resources.files("kvcache.server").joinpath("static/index.html").read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return page


class LocalBackend:
    """The engine thread of this process."""

    def __init__(self, llm: LLM, engine: EngineThread, metrics: ServerMetrics):
        self.engine, self.metrics = engine, metrics
        self.tokenizer, self.context, self.vocab_size = llm.tokenizer, llm.config.max_positions, llm.config.vocab_size
        self.capacity_tokens = llm.capacity_tokens

    def run(self) -> LocalRun:
        return LocalRun(self.engine)

    def failed(self) -> None:
        self.metrics.failed()


class LocalRun(QueuedRun):
    """The engine requests of one HTTP request; unfinished ones are aborted when the run is closed (the client
    left or an error)."""

    def __init__(self, engine: EngineThread):
        super().__init__()
        self.engine, self.ids = engine, {}  # prompt index -> engine request id

    async def add(self, prompts: list[list[int]], params: SamplingParams, salt: str | None) -> None:
        try:
            for tag, ids in enumerate(prompts):
                self.ids[tag] = await self.engine.add(ids, params, salt, self.out, tag)
                self.open.add(tag)
        except Overloaded as exc:
            self.close()
            raise overloaded_error(exc) from None
        except (TypeError, ValueError) as exc:
            self.close()
            raise OpenAIError(str(exc)) from None
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for tag in self.open:
            self.engine.abort(self.ids[tag])
        self.open = set()


def overloaded_error(exc: Overloaded) -> OpenAIError:
    """429 with Retry-After: the engine's queue is full; the client should come back, not wait here."""
    return OpenAIError(str(exc), 429, code="overloaded", kind="rate_limit_error",
                       headers={"Retry-After": str(exc.retry_after)})
