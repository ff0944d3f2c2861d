"""A multi-turn conversation whose KV cache lives as long as the conversation.

Each turn renders the whole conversation with the model's chat template, finds
the longest prefix of those tokens whose keys/values the cache already holds
(the earlier turns), crops the cache back to it and prefills only the rest:
a new turn costs its own tokens, not the whole history again.  Comparing
tokens rather than trusting the template to only append keeps it exact for any
template, including ones that re-tokenize the assistant's reply differently.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

from ..caches.registry import make_cache
from ..model.chat_template import check_messages
from .detokenizer import Detokenizer
from .generate import stream


@dataclass
class TurnStats:
    prompt_tokens: int  # the whole rendered conversation
    prefilled_tokens: int  # what this turn actually computed (the rest came from the cache)
    new_tokens: int
    seconds: float = 0.0

    @property
    def reused_tokens(self) -> int:
        return self.prompt_tokens - self.prefilled_tokens


class ChatSession:
    """``send(text)`` streams the assistant's reply as text pieces; ``reset()`` forgets the conversation."""

    def __init__(self, model, system: str | None = None, max_new_tokens: int = 256, kv_cache: str | None = None,
                 **sampling):
        if not model.tokenizer.chat_template:
            raise ValueError("this model has no chat template: chat needs an instruction-tuned model "
                             "(e.g. --model smollm2-135m)")
        self.model, self.system, self.max_new_tokens, self.sampling = model, system, max_new_tokens, sampling
        self.messages: list[dict[str, str]] = []
        self.cache = make_cache(kv_cache, model, capacity=1024)  # any spec: "int8", "int4:residual=64", ...
        self.cached_ids: list[int] = []  # the tokens whose KV the cache holds, in order
        self.last: TurnStats | None = None
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.cache.reset()
        self.cached_ids = []

    def _reuse(self, ids: list[int]) -> int:
        """Crop the cache to the longest prefix it shares with ``ids`` (leaving >= 1 token to feed)."""
        keep = 0
        limit = min(len(self.cached_ids), len(ids) - 1)
        while keep < limit and self.cached_ids[keep] == ids[keep]:
            keep += 1
        self.cache.crop(keep)
        del self.cached_ids[keep:]
        return keep

    def send(self, text: str) -> Iterator[str]:
        """Add a user message, then yield the reply as it is generated; the reply joins the conversation."""
        messages = check_messages(self.messages + [{"role": "user", "content": text}])
        tok = self.model.tokenizer
        ids = tok.encode_chat(messages)
        room = self.model.config.max_positions - len(ids)
        if room < 1:
            raise ValueError(f"the conversation is {len(ids)} tokens, the model's context is "
                             f"{self.model.config.max_positions}: /reset to start again")
        keep = self._reuse(ids)
        tokens = stream(self.model, ids, min(self.max_new_tokens, room), cache=self.cache, **self.sampling)
        self.messages = messages
        decoder, reply, start = Detokenizer(tok), [], time.perf_counter()
        self.last = TurnStats(len(ids), len(ids) - keep, 0)
        try:
            for token in tokens:
                reply.append(token)
                self.last.new_tokens = len(reply)
                if token in tok.eos_token_ids:
                    break
                piece = decoder.push(token)
                if piece:
                    yield piece
            yield decoder.flush()
        finally:  # an interrupted reply still joins the conversation, as far as it got
            self.last.seconds = time.perf_counter() - start
            self.cache.crop(len(self.cache))  # a pass interrupted mid-way leaves layers uneven: even them out
            self.cached_ids = (ids + reply)[:len(self.cache)]
            content = tok.decode([t for t in reply if t not in tok.eos_token_ids])
            self.messages = messages + [{"role": "assistant", "content": content}]

    @property
    def cache_bytes(self) -> int:
        """Bytes of KV the conversation occupies now."""
        return self.cache.used_bytes
