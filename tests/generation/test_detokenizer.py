"""The incremental detokenizer: UTF-8 characters split across tokens, stop strings spanning steps,
the stream holding back what may begin a stop string, and the text equal to a full decode."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from kvcache.generation.detokenizer import Detokenizer
from kvcache.model.tokenizer import Tokenizer

TEXT = "héllo wörld 👋 ∑ — ok"


def first_stop(text: str, stops: tuple[str, ...]) -> int | None:
    """Feed ``text`` one byte-token at a time; the index of the token that completes a stop string."""
    detok = Detokenizer(Tokenizer.bytes(), stops)
    for i, byte in enumerate(text.encode()):
        detok.push(byte)
        assert detok.read - detok.prefix <= 4  # the window never grows beyond a character
        if detok.stop_at is not None:
            return i
    return None


def test_match_spanning_tokens_and_steps():
    text = "abc\nxyz"
    assert first_stop(text, ("\n",)) == 3
    assert first_stop(text, ("c\nx",)) == 4
    assert first_stop(text, ("bc", "\nxyz")) == 2
    assert first_stop(text, ("zz",)) is None
    assert first_stop(text, ("wxyz", "bc\nx")) == 4  # the tail kept for the longest stop string


def test_multibyte_characters():
    text = "héllo wörld"  # é and ö are two bytes (two tokens) each
    b = text.encode()
    assert first_stop(text, ("é",)) == b.index("é".encode()) + 1  # only once the character is complete
    assert first_stop(text, ("ö",)) == b.index("ö".encode()) + 1
    assert first_stop(text, ("o w",)) == b.index(b"o w") + 2
    assert first_stop(text, ("ll\u00f6",)) is None


def test_output_cut_before_the_earliest_stop():
    cases = [("abc\n\nd", ("\n\n", "\n"), "abc"), ("abc", ("x",), "abc"), ("a stop", ("stop", "a"), "")]
    for text, stops, want in cases:
        detok = Detokenizer(Tokenizer.bytes(), stops)
        for byte in text.encode():
            detok.push(byte)
            if detok.stop_at is not None:
                break
        assert detok.output_text == want


def test_pieces_never_split_a_character():
    data = TEXT.encode("utf-8")
    detok, emitted = Detokenizer(Tokenizer.bytes()), ""
    for i, byte in enumerate(data):
        piece = detok.push(byte)
        assert "\ufffd" not in piece
        emitted += piece
        assert emitted == data[: i + 1].decode("utf-8", errors="ignore")  # all complete text, nothing more
    assert emitted + detok.flush() == TEXT == detok.output_text


def test_preview_changes_nothing():
    detok = Detokenizer(Tokenizer.bytes(), ("lo",))
    for byte in b"hel":
        detok.push(byte)
    before = vars(detok).copy()
    assert detok.preview(ord("l")).stop_at is None and detok.preview(ord("o")).text == "o"
    assert vars(detok) == before


@given(st.text(max_size=40), st.lists(st.text(min_size=1, max_size=4), max_size=3))
def test_streamed_text_is_the_output_text_and_never_retracted(text, stops):
    """Whatever the text and stops: the stream hands out exactly the output, and never a character of a stop."""
    detok, streamed = Detokenizer(Tokenizer.bytes(), tuple(stops)), ""
    for byte in text.encode():
        detok.push(byte)
        streamed += detok.take(finished=False)
        assert detok.output_text.startswith(streamed)
        if detok.stop_at is not None:
            break
    detok.flush()
    streamed += detok.take(finished=True)
    assert streamed == detok.output_text
    cuts = [i for i in (text.find(s) for s in stops) if i >= 0]
    assert streamed == (text[:min(cuts)] if cuts else text)
