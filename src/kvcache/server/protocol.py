"""OpenAI's request bodies and errors, and their translation to the engine's ``SamplingParams``.

Field names and defaults are OpenAI's (``max_tokens`` 16 for completions, the rest of the context for chat,
``temperature`` 1.0), with vLLM's extras where they fit (``top_k``, ``ignore_eos``, ``stop_token_ids``,
``cache_salt``).  Types are strict: ``"5"`` is not a number.  What the engine cannot do exactly
(log-probabilities, penalties, ``best_of``, ``suffix``) is refused by name rather than ignored.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..engine.sequence import SamplingParams


class OpenAIError(Exception):
    """A request the server refuses: an HTTP status and OpenAI's error body."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.param, self.code, self.kind = status, param, code, kind
        self.headers = headers  # e.g. Retry-After on a 429 / 503

    def body(self) -> dict[str, Any]:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        """An explicit JSON ``null`` for an optional field means its default, as OpenAI's API reads it."""
        if not isinstance(data, dict):
            return data
        fields = cls.model_fields
        return {k: v for k, v in data.items()
                if not (v is None and k in fields and not fields[k].is_required() and fields[k].default is not None)}


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    model: str | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[int, Field(ge=-1)] | None = None  # -1 or 0: off (vLLM)
    n: Annotated[int, Field(ge=1, le=128)] = 1
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    cache_salt: str | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    best_of: int | None = None
    user: str | None = None

    def _refuse_unsupported(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise OpenAIError(f"{name} is not supported by this server (only 0)", param=name)
        if self.best_of is not None and self.best_of != self.n:
            raise OpenAIError("best_of is not supported (only best_of == n)", param="best_of")
        if self.stream_options is not None and not self.stream:
            raise OpenAIError("stream_options is only allowed when stream is true", param="stream_options")

    def sampling_params(self, max_new_tokens: int) -> SamplingParams:
        """The engine's params; a value the engine refuses becomes a 400 naming it."""
        self._refuse_unsupported()
        temperature = 1.0 if self.temperature is None else self.temperature
        try:
            return SamplingParams(
                max_new_tokens=max_new_tokens, temperature=temperature, n=self.n, seed=self.seed,
                top_k=None if self.top_k in (None, -1, 0) else self.top_k,
                top_p=None if self.top_p in (None, 1.0) else self.top_p,
                stop=self.stop or None, stop_token_ids=self.stop_token_ids, ignore_eos=self.ignore_eos)
        except (TypeError, ValueError) as exc:
            raise OpenAIError(str(exc)) from None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


TokenIds = list[Annotated[int, Field(ge=0)]]


class CompletionRequest(_Sampling):
    prompt: str | list[str] | TokenIds | list[TokenIds]
    max_tokens: Annotated[int, Field(ge=1)] | None = 16
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None

    def prompts(self) -> list[str | list[int]]:
        """One prompt or several: text, token ids, or a list of either."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            p = [p]
        if not p or any(len(x) == 0 for x in p):
            raise OpenAIError("prompt must not be empty", param="prompt")
        return list(p)

    def check(self) -> None:
        if self.logprobs is not None:
            raise OpenAIError("logprobs is not supported by this server", param="logprobs")
        if self.suffix is not None:
            raise OpenAIError("suffix is not supported by this server", param="suffix")


class TextPart(_Body):
    type: Literal["text"]
    text: str


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def as_dict(self, roles: frozenset[str] = frozenset()) -> dict[str, str]:
        """The message for a chat template; ``developer`` becomes ``system`` unless the template knows it
        (``roles``), as OpenAI and vLLM map it."""
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        role = "system" if self.role == "developer" and "developer" not in roles else self.role
        return {"role": role, "content": content or ""}


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None

    def check(self) -> None:
        if self.logprobs or self.top_logprobs is not None:
            raise OpenAIError("logprobs is not supported by this server", param="logprobs")

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class TokenizeRequest(_Body):
    model: str | None = None
    prompt: str | None = None
    messages: list[Message] | None = None
    add_generation_prompt: bool = True


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: TokenIds


def validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """pydantic's errors as one line, and the first offending field (OpenAI's ``param``)."""
    parts, param = [], None
    for err in errors[:3]:
        if err.get("type") == "json_invalid":
            return f"the body is not valid JSON: {err.get('ctx', {}).get('error', err.get('msg'))}", None
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        field = ".".join(loc)
        param = param or (field or None)
        parts.append(f"{field}: {err.get('msg')}" if field else str(err.get("msg")))
    return "; ".join(parts) or "invalid request body", param
