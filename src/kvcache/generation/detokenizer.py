"""The one incremental detokenizer: token ids in, text pieces out, stop strings found on the way.

Decoding the whole output every step would cost O(n^2) over a stream.  As in
vLLM, each new token decodes only a short window: the tokens since the last
complete character plus the window before them for context (a token's text can
depend on its neighbours, e.g. byte-level pieces of one character).  A stop
string is looked for only in the new text and the ``longest stop - 1``
characters before it: any newly completed match lies there, and earlier text
held none.

Streaming (``take``) holds back those ``longest stop - 1`` characters until the
stream ends, so text that turns out to begin a stop string is never sent (vLLM
does the same).  ``preview`` is pure, so the engine decides whether a token
stops a sequence before anything changes.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Piece:
    """What one token adds: its text ("" while a character is incomplete) and where a stop string begins."""

    text: str
    complete: bool  # the window decoded to whole characters: the offsets move on
    stop_at: int | None = None  # index in the full text where the earliest new stop string starts


class Detokenizer:
    def __init__(self, tokenizer, stops: tuple[str, ...] = ()):
        self.tokenizer, self.stops = tokenizer, tuple(stops)
        self._keep = max(map(len, self.stops)) - 1 if self.stops else 0
        self.ids: list[int] = []
        self.prefix = 0  # start of the decoding window
        self.read = 0  # tokens whose text is in ``text``
        self.text = ""
        self.stop_at: int | None = None
        self.sent = 0  # characters handed out by ``take``

    def preview(self, token: int) -> Piece:
        """The piece ``token`` would add, changing nothing."""
        before = self.tokenizer.decode(self.ids[self.prefix:self.read])
        text = self.tokenizer.decode(self.ids[self.prefix:] + [token])
        if text.endswith("\ufffd") or len(text) <= len(before):  # incomplete character: wait for more tokens
            return Piece("", False)
        piece = text[len(before):]
        if not self.stops:
            return Piece(piece, True)
        start = max(0, len(self.text) - self._keep)
        seen = self.text[start:] + piece
        hits = [i for i in (seen.find(s) for s in self.stops) if i >= 0]
        return Piece(piece, True, start + min(hits) if hits else None)

    def commit(self, token: int, piece: Piece) -> None:
        """Append ``token`` with the piece ``preview(token)`` returned."""
        self.ids.append(token)
        if piece.complete:
            self.prefix, self.read = self.read, len(self.ids)
            self.text += piece.text
        if piece.stop_at is not None and self.stop_at is None:
            self.stop_at = piece.stop_at

    def push(self, token: int) -> str:
        """Append ``token``; the new text (maybe "")."""
        piece = self.preview(token)
        self.commit(token, piece)
        return piece.text

    def flush(self) -> str:
        """The end of the stream: the text of tokens still waiting for a character's last byte."""
        before = self.tokenizer.decode(self.ids[self.prefix:self.read])
        rest = self.tokenizer.decode(self.ids[self.prefix:])[len(before):]
        self.prefix = self.read = len(self.ids)
        self.text += rest
        return rest

    @property
    def output_text(self) -> str:
        """The text so far, cut before the first stop string (which is left out, as in vLLM)."""
        return self.text if self.stop_at is None else self.text[:self.stop_at]

    def take(self, finished: bool) -> str:
        """Text not handed out yet that can no longer become part of a stop string; all of it once finished."""
        if self.stop_at is not None:
            end = self.stop_at
        else:
            end = len(self.text) if finished else len(self.text) - self._keep
        delta = self.text[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return delta
