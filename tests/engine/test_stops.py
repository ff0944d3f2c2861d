"""The incremental stop-string check on its own: UTF-8 characters split across tokens, matches
spanning steps, and the text cut."""

from __future__ import annotations

from kvcache.engine.stops import StopState, check_stops, truncate
from kvcache.model.tokenizer import Tokenizer


def run(text: str, stops: tuple[str, ...]) -> int | None:
    """Feed ``text`` one byte-token at a time; the index of the token that completes a stop string."""
    tok, ids, state = Tokenizer.bytes(), list(text.encode()), StopState()
    for i in range(len(ids)):
        hit, state = check_stops(tok, ids[state.prefix:i + 1], stops, state)
        if hit:
            return i
        assert state.read - state.prefix <= 4  # the window never grows beyond a character
    return None


def test_match_spanning_tokens_and_steps():
    text = "abc\nxyz"
    assert run(text, ("\n",)) == 3
    assert run(text, ("c\nx",)) == 4
    assert run(text, ("bc", "\nxyz")) == 2
    assert run(text, ("zz",)) is None
    assert run(text, ("wxyz", "bc\nx")) == 4  # the tail kept for the longest stop string


def test_multibyte_characters():
    text = "héllo wörld"  # é and ö are two bytes (two tokens) each
    b = text.encode()
    assert run(text, ("é",)) == b.index("é".encode()) + 1  # only once the character is complete
    assert run(text, ("ö",)) == b.index("ö".encode()) + 1
    assert run(text, ("o w",)) == b.index(b"o w") + 2
    assert run(text, ("ll\u00f6",)) is None


def test_truncate_cuts_before_the_earliest_stop():
    assert truncate("abc\n\nd", ("\n\n", "\n")) == "abc"
    assert truncate("abc", ("x",)) == "abc"
    assert truncate("a stop", ("stop", "a")) == ""
