"""OpenAI's completions, chat, tokenize and detokenize endpoints over a ``Backend`` that runs requests.

The same code serves one engine in this process (``app.py``) and engine replicas behind a router
(``kvcache.distributed``), so bodies, streaming, usage and error bodies are the same in both.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine.sequence import RequestDelta, SamplingParams
from .protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    Message,
    OpenAIError,
    TokenizeRequest,
    validation_message,
)

_POLL_DISCONNECT = 0.1  # seconds between checks that a non-streaming client is still there


class Run(Protocol):
    """The engine requests of one HTTP request (several prompts, each with n completions)."""

    async def add(self, prompts: list[list[int]], params: SamplingParams, salt: str | None) -> None:
        """Start every prompt; a request the engine refuses raises OpenAIError (nothing is left running)."""

    def deltas(self, timeout: float | None = None) -> AsyncIterator[tuple[int, RequestDelta] | None]:
        """(prompt index, delta) until every request finished; ``None`` after ``timeout`` s without one."""

    def close(self) -> None:
        """Abort what has not finished (the client left, or an error)."""


class QueuedRun:
    """The deltas of a run's prompts on one queue, as (prompt index, delta) in arrival order: a base for runs."""

    def __init__(self):
        self.out: asyncio.Queue = asyncio.Queue()
        self.open: set[int] = set()  # prompt indices not finished yet

    async def deltas(self, timeout: float | None = None) -> AsyncIterator[tuple[int, RequestDelta] | None]:
        while self.open:
            try:
                tag, delta = await asyncio.wait_for(self.out.get(), timeout)
            except asyncio.TimeoutError:
                yield None
                continue
            if delta.finished:
                self.open.discard(tag)
            yield tag, delta


class Backend(Protocol):
    tokenizer: Any  # None for a model without one: prompts are token ids
    context: int  # the model's maximum positions
    capacity_tokens: int  # tokens of KV the largest request may hold
    vocab_size: int

    def run(self) -> Run: ...

    def failed(self) -> None:
        """Count a request that failed inside the engine."""


def add_error_handlers(app: FastAPI, log) -> None:
    """Every refusal gets OpenAI's error body, with a status that says whose fault it was."""

    @app.exception_handler(OpenAIError)
    async def openai_error(_: Request, exc: OpenAIError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(_: Request, exc: RequestValidationError):
        message, param = validation_message(exc.errors())
        return JSONResponse(OpenAIError(message, param=param).body(), status_code=400)

    @app.exception_handler(Exception)
    async def server_error(_: Request, exc: Exception):  # a bug, not the client's fault: still OpenAI's body
        log.exception("unexpected error while serving a request")
        return JSONResponse(OpenAIError(f"internal error: {type(exc).__name__}", 500, kind="server_error").body(),
                            status_code=500)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(OpenAIError(str(exc.detail), exc.status_code, kind=kind).body(),
                            status_code=exc.status_code)


def add_api_routes(app: FastAPI, api: OpenAIApi) -> None:
    app.post("/v1/completions")(api.completions)
    app.post("/v1/chat/completions")(api.chat_completions)
    app.get("/v1/models")(api.models)
    app.post("/tokenize")(api.tokenize)
    app.post("/detokenize")(api.detokenize)


class OpenAIApi:
    """The endpoints' logic over a ``Backend``: one engine in this process, or replicas behind a router."""

    def __init__(self, backend: Backend, model_name: str):
        self.backend, self.name = backend, model_name
        self.tokenizer, self.context = backend.tokenizer, backend.context

    # --- endpoints -------------------------------------------------------------
    async def models(self):
        return {"object": "list", "data": [{"id": self.name, "object": "model", "created": int(time.time()),
                                            "owned_by": "kvcache", "max_model_len": self.context}]}

    async def completions(self, body: CompletionRequest, request: Request):
        self._check_model(body.model)
        body.check()
        prompts = [self._encode(p) for p in body.prompts()]
        for ids in prompts:
            self._check_length(ids, body.max_tokens, "max_tokens")
        params = body.sampling_params(body.max_tokens)
        echo = [self._decode(ids) if body.echo else "" for ids in prompts]
        run = self.backend.run()
        await run.add(prompts, params, body.cache_salt)
        head = _head("cmpl", "text_completion", self.name)
        if body.stream:
            return _sse(self._stream_completion(run, head, body, prompts, echo), run)
        choices, usage = await self._collect(run, request, prompts, body.n)
        return {**head, "choices": [{"index": i, "text": echo[i // body.n] + text, "logprobs": None,
                                     "finish_reason": reason} for i, (text, reason) in enumerate(choices)],
                "usage": usage}

    async def chat_completions(self, body: ChatCompletionRequest, request: Request):
        self._check_model(body.model)
        body.check()
        ids = self._chat_ids(body.messages)
        if body.max_new_tokens is None:  # the rest of the context, at least one token
            self._check_length(ids, 1, "messages")
        room = min(self.context, self.backend.capacity_tokens) - len(ids)
        max_new = body.max_new_tokens if body.max_new_tokens is not None else room
        self._check_length(ids, max_new, "max_tokens" if body.max_new_tokens is not None else "messages")
        params = body.sampling_params(max_new)
        run = self.backend.run()
        await run.add([ids], params, body.cache_salt)
        head = _head("chatcmpl", "chat.completion", self.name)
        if body.stream:
            return _sse(self._stream_chat(run, {**head, "object": "chat.completion.chunk"}, body, [ids]), run)
        choices, usage = await self._collect(run, request, [ids], body.n)
        return {**head, "choices": [{"index": i, "message": {"role": "assistant", "content": text},
                                     "logprobs": None, "finish_reason": reason}
                                    for i, (text, reason) in enumerate(choices)], "usage": usage}

    async def tokenize(self, body: TokenizeRequest):
        self._check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise OpenAIError("give exactly one of prompt and messages", param="prompt")
        if body.messages is not None:
            ids = self._chat_ids(body.messages, body.add_generation_prompt)
        else:
            ids = self._encode(body.prompt)
        return {"count": len(ids), "max_model_len": self.context, "tokens": ids}

    async def detokenize(self, body: DetokenizeRequest):
        self._check_model(body.model)
        self._check_vocab(body.tokens, "tokens")
        return {"prompt": self._decode(body.tokens)}

    # --- streaming -------------------------------------------------------------
    async def _stream_completion(self, run: Run, head: dict, body: CompletionRequest, prompts, echo):
        n = body.n
        if body.echo:
            for i in range(len(prompts) * n):
                yield {**head, "choices": [_text_choice(i, echo[i // n], None)]}

        def choices(tag, c):
            if c.text or c.finish_reason:
                yield _text_choice(tag * n + c.index, c.text or "", c.finish_reason)

        async for chunk in self._stream(run, head, body, prompts, choices):
            yield chunk

    async def _stream_chat(self, run: Run, head: dict, body: ChatCompletionRequest, prompts):
        for i in range(body.n):
            yield {**head, "choices": [_chat_choice(i, {"role": "assistant", "content": ""}, None)]}

        def choices(_, c):
            if c.text:
                yield _chat_choice(c.index, {"content": c.text}, None)
            if c.finish_reason:
                yield _chat_choice(c.index, {}, c.finish_reason)

        async for chunk in self._stream(run, head, body, prompts, choices):
            yield chunk

    async def _stream(self, run: Run, head: dict, body, prompts, choices):
        """The chunks of every delta (``choices(prompt index, completion delta)`` makes them), an error event
        if the request failed, and the usage chunk if asked for."""
        usage = _Usage(prompts)
        async for tag, delta in run.deltas():
            if delta.error is not None:
                yield self._failed(delta)
                return
            usage.add(delta)
            for c in delta.outputs:
                for choice in choices(tag, c):
                    yield {**head, "choices": [choice]}
        if body.include_usage:
            yield {**head, "choices": [], "usage": usage.body()}

    def _failed(self, delta: RequestDelta) -> dict:
        self.backend.failed()
        return OpenAIError(delta.error or "the request failed", 500, kind="internal_server_error").body()

    async def _collect(self, run: Run, request: Request, prompts, n: int):
        """Wait for every completion; abort if the client disconnects meanwhile."""
        texts = {i: [] for i in range(len(prompts) * n)}
        reasons: dict[int, str | None] = {}
        usage = _Usage(prompts)
        checked = time.monotonic()
        try:
            async for item in run.deltas(timeout=_POLL_DISCONNECT):
                if time.monotonic() - checked >= _POLL_DISCONNECT:  # busy or idle, look every so often
                    checked = time.monotonic()
                    if await request.is_disconnected():
                        return [], {}
                if item is None:
                    continue
                tag, delta = item
                if delta.error is not None:
                    self.backend.failed()
                    raise OpenAIError(delta.error, 500, kind="internal_server_error")
                usage.add(delta)
                for c in delta.outputs:
                    texts[tag * n + c.index].append(c.text or "")
                    reasons[tag * n + c.index] = c.finish_reason or reasons.get(tag * n + c.index)
        finally:
            run.close()
        return [("".join(texts[i]), reasons.get(i)) for i in sorted(texts)], usage.body()

    # --- checks ------------------------------------------------------------------
    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.name:
            raise OpenAIError(f"The model `{model}` does not exist (this server serves `{self.name}`)", 404,
                              param="model", code="model_not_found", kind="not_found_error")

    def _check_length(self, ids: list[int], max_new: int, param: str) -> None:
        if len(ids) + max_new > self.context:
            raise OpenAIError(f"This model's maximum context length is {self.context} tokens. However, you "
                              f"requested {len(ids) + max_new} tokens ({len(ids)} in the prompt, {max_new} in "
                              "the completion). Please reduce the prompt or the completion length.",
                              param=param, code="context_length_exceeded")
        if len(ids) + max_new > self.backend.capacity_tokens:
            raise OpenAIError(f"the request needs {len(ids) + max_new} tokens of KV but the server's whole pool "
                              f"holds {self.backend.capacity_tokens}", param=param, code="kv_capacity_exceeded")

    def _check_vocab(self, ids: list[int], param: str) -> None:
        vocab = self.backend.vocab_size
        if any(t >= vocab for t in ids):
            raise OpenAIError(f"token ids must be below the vocabulary size {vocab}", param=param)

    def _encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, list):
            self._check_vocab(prompt, "prompt")
            return prompt
        if self.tokenizer is None:
            raise OpenAIError("this model has no tokenizer: send the prompt as token ids", param="prompt")
        try:
            return self.tokenizer.encode(prompt)
        except (TypeError, ValueError) as exc:
            raise OpenAIError(f"the prompt: {exc}", param="prompt") from None

    def _decode(self, ids: list[int]) -> str:
        if self.tokenizer is None:
            raise OpenAIError("this model has no tokenizer: it cannot turn token ids into text")
        return self.tokenizer.decode(ids)

    def _chat_ids(self, messages: list[Message], add_generation_prompt: bool = True) -> list[int]:
        if self.tokenizer is None or not self.tokenizer.chat_template:
            raise OpenAIError(f"the model `{self.name}` has no chat template: use /v1/completions",
                              param="messages")
        roles = frozenset({"developer"} if "developer" in self.tokenizer.chat_template else ())
        try:
            text = self.tokenizer.apply_chat_template([m.as_dict(roles) for m in messages],
                                                      add_generation_prompt=add_generation_prompt)
        except (TypeError, ValueError) as exc:
            raise OpenAIError(f"the chat template refused the messages: {exc}", param="messages") from None
        return self._encode(text)


class _Usage:
    def __init__(self, prompts: list[list[int]]):
        self.prompt, self.completion, self.cached = sum(map(len, prompts)), 0, 0

    def add(self, delta: RequestDelta) -> None:
        self.completion += sum(len(c.token_ids) for c in delta.outputs)
        if delta.finished:
            self.cached += delta.metrics.cached_prompt_tokens

    def body(self) -> dict[str, Any]:
        return {"prompt_tokens": self.prompt, "completion_tokens": self.completion,
                "total_tokens": self.prompt + self.completion,
                "prompt_tokens_details": {"cached_tokens": self.cached}}


def _head(prefix: str, kind: str, model: str) -> dict[str, Any]:
    return {"id": f"{prefix}-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()), "model": model}


def _text_choice(index: int, text: str, reason: str | None) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": None, "finish_reason": reason}


def _chat_choice(index: int, delta: dict, reason: str | None) -> dict[str, Any]:
    return {"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}


def _sse(chunks: AsyncIterator[dict], run: Run) -> StreamingResponse:
    """Server-sent events as OpenAI sends them, ending with ``data: [DONE]``.  If the client disconnects,
    Starlette cancels this generator: ``finally`` aborts what is still running."""

    async def events():
        try:
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            run.close()

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
