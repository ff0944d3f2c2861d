"""Chat templates rendered with jinja2 the way transformers' ``apply_chat_template`` renders them.

Same environment (sandboxed, ``trim_blocks``, ``lstrip_blocks``, loop controls),
the same helpers templates rely on (``raise_exception``, ``strftime_now``, a
``tojson`` that does not HTML-escape), and the special-token strings passed as
variables, so a conversation renders to the same text, byte for byte.
Templates come from model files, i.e. they are untrusted code: hence the sandbox.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

ROLES = ("system", "user", "assistant", "tool")


def _raise_exception(message: str):
    from jinja2.exceptions import TemplateError

    raise TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
            sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def _compile(template: str):
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(template)


def check_messages(messages: Any) -> list[dict[str, Any]]:
    """A list of {'role', 'content'} dicts with known roles and text content; a clear error otherwise."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content', got {m!r}")
        if m["role"] not in ROLES:
            raise ValueError(f"messages[{i}] has role {m['role']!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise TypeError(f"messages[{i}]['content'] must be text, got {type(m['content']).__name__}")
    return [dict(m) for m in messages]


def render(template: str, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **variables: Any) -> str:
    """The conversation as text; ``variables`` are bos_token, eos_token and any template switches."""
    from jinja2.exceptions import TemplateError

    messages = check_messages(messages)
    try:
        return _compile(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         tools=None, documents=None, **variables)
    except TemplateError as exc:
        raise ValueError(f"the chat template refused the conversation: {exc}") from None
