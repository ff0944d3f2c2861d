"""Stop strings, checked incrementally: a step decodes only a short window of tokens.

Decoding the whole output every step would cost O(n^2) over a request.  As in
vLLM (and :class:`kvcache.model.tokenizer.StreamDecoder`), each check decodes
the tokens since the last complete character, plus the previous window for
context (a token's text can depend on its neighbours), and looks for a stop
string only in the new text and the ``longest stop - 1`` characters before it:
any newly completed match lies there, and earlier text held none.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StopState:
    """Where the checker is in a sequence's output (offsets count output tokens)."""

    prefix: int = 0  # start of the decoding window
    read: int = 0  # tokens whose text has been checked
    tail: str = ""  # the last len(longest stop) - 1 characters checked


def check_stops(tokenizer, window: list[int], stops: tuple[str, ...], state: StopState) -> tuple[bool, StopState]:
    """Does a stop string end in the new text?  ``window``: the output tokens from
    ``state.prefix`` on, the new one last.  Pure: the caller keeps the new state
    only once the token is really appended."""
    before = tokenizer.decode(window[:state.read - state.prefix])
    text = tokenizer.decode(window)
    if text.endswith("\ufffd") or len(text) <= len(before):  # incomplete character: wait for more tokens
        return False, state
    seen = state.tail + text[len(before):]
    keep = max(map(len, stops)) - 1
    new = StopState(state.read, state.prefix + len(window), seen[max(0, len(seen) - keep):] if keep else "")
    return any(s in seen for s in stops), new


def truncate(text: str, stops: tuple[str, ...]) -> str:
    """``text`` cut before its earliest stop string (vLLM leaves the stop string out)."""
    cuts = [i for i in (text.find(s) for s in stops) if i >= 0]
    return text[:min(cuts)] if cuts else text
