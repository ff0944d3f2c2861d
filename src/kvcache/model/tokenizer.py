"""Text <-> token ids: a checkpoint's ``tokenizer.json`` via ``tokenizers``, or raw bytes.

The byte fallback (id = byte value) lets a checkpoint without a tokenizer,
such as a random-weight test model, still take text prompts.
"""

from __future__ import annotations

from pathlib import Path


class Tokenizer:
    """A thin wrapper so both kinds share encode/decode/eos."""

    def __init__(self, backend=None, vocab_size: int = 256, eos_token_ids: list[int] | None = None):
        self.backend = backend
        self.vocab_size = backend.get_vocab_size() if backend is not None else vocab_size
        self.eos_token_ids = list(eos_token_ids or [])

    @classmethod
    def from_file(cls, path: str | Path, eos_token_ids: list[int] | None = None) -> "Tokenizer":
        from tokenizers import Tokenizer as HFTokenizer

        return cls(HFTokenizer.from_file(str(path)), eos_token_ids=eos_token_ids)

    @classmethod
    def bytes(cls, eos_token_ids: list[int] | None = None) -> "Tokenizer":
        return cls(None, 256, eos_token_ids)

    @property
    def is_byte_level_fallback(self) -> bool:
        return self.backend is None

    def encode(self, text: str) -> list[int]:
        if self.backend is None:
            return list(text.encode("utf-8"))
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        if self.backend is None:
            return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")
        return self.backend.decode(list(ids), skip_special_tokens=False)


class StreamDecoder:
    """Turns a stream of token ids into text pieces without splitting a UTF-8 character.

    Incremental, as in vLLM: only a short window of recent tokens is decoded per
    push (a token's text can depend on its neighbours, e.g. byte-level pieces of
    one character), so streaming n tokens costs O(n), not O(n^2).
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0  # start of the decoding window
        self.read_offset = 0  # tokens whose text has been emitted

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset])
        text = self.tokenizer.decode(self.ids[self.prefix_offset:])
        if text.endswith("\ufffd") or len(text) <= len(prefix):  # incomplete character: wait for more tokens
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return text[len(prefix):]

    def flush(self) -> str:
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset])
        text = self.tokenizer.decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return text[len(prefix):]
