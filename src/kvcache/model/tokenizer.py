"""Text <-> token ids: a checkpoint's ``tokenizer.json`` via ``tokenizers``, or raw bytes.

The byte fallback (id = byte value) lets a checkpoint without a tokenizer,
such as a random-weight test model, still take text prompts.  A tokenizer
also carries the checkpoint's chat template and special-token strings
(``tokenizer_config.json``), which ``apply_chat_template`` renders.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .config import read_json_object

SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")


class Tokenizer:
    """A thin wrapper so both kinds share encode/decode/eos."""

    def __init__(self, backend=None, vocab_size: int = 256, eos_token_ids: list[int] | None = None,
                 chat_template: str | None = None, special_tokens: dict[str, str] | None = None):
        self.backend = backend
        self.vocab_size = backend.get_vocab_size() if backend is not None else vocab_size
        self.eos_token_ids = list(eos_token_ids or [])
        self.chat_template = chat_template
        self.special_tokens = dict(special_tokens or {})  # bos_token, eos_token, ...: strings the template sees

    @classmethod
    def from_file(cls, path: str | Path, eos_token_ids: list[int] | None = None,
                  config: dict[str, Any] | None = None) -> "Tokenizer":
        """``tokenizer.json`` at ``path``; ``config`` is the folder's ``tokenizer_config.json`` if any."""
        from tokenizers import Tokenizer as HFTokenizer

        try:
            backend = HFTokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception for a malformed file
            raise ValueError(f"{path}: not a readable tokenizer ({exc})") from None
        return cls.from_backend(backend, eos_token_ids, config)

    @classmethod
    def from_backend(cls, backend, eos_token_ids: list[int] | None = None,
                     config: dict[str, Any] | None = None) -> "Tokenizer":
        config = config or {}
        special = {k: _token_text(config[k]) for k in SPECIAL_TOKEN_KEYS if config.get(k) is not None}
        return cls(backend, eos_token_ids=eos_token_ids, chat_template=_template_text(config.get("chat_template")),
                   special_tokens=special)

    @classmethod
    def from_folder(cls, folder: Path, eos_token_ids: list[int] | None = None) -> "Tokenizer":
        """The folder's tokenizer.json (+ tokenizer_config.json), or the byte fallback without one."""
        config_file = folder / "tokenizer_config.json"
        config = read_json_object(config_file) if config_file.exists() else {}
        tok_file = folder / "tokenizer.json"
        if not tok_file.exists():
            return cls.bytes(eos_token_ids)
        return cls.from_file(tok_file, eos_token_ids, config)

    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of the conversation rendered by the chat template (the assistant's turn opened)."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt))

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            **kwargs: Any) -> str:
        """The conversation as the model's chat template writes it (transformers' ``apply_chat_template``)."""
        from .chat_template import render

        if not self.chat_template:
            raise ValueError("this model's tokenizer has no chat template (tokenizer_config.json 'chat_template')")
        return render(self.chat_template, messages, add_generation_prompt=add_generation_prompt,
                      **{**self.special_tokens, **kwargs})

    @classmethod
    def bytes(cls, eos_token_ids: list[int] | None = None) -> "Tokenizer":
        return cls(None, 256, eos_token_ids)

    @property
    def is_byte_level_fallback(self) -> bool:
        return self.backend is None

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text to encode must be a str, got {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:  # lone surrogates: bytes that were not UTF-8 (e.g. a raw argv)
            raise ValueError(f"the text is not valid UTF-8 (at character {exc.start}: {text[exc.start:exc.end]!r})"
                             ) from None
        if self.backend is None:
            return list(text.encode("utf-8"))
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        if self.backend is None:
            return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")
        return self.backend.decode(list(ids), skip_special_tokens=False)


def _token_text(value: Any) -> str:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    return value["content"] if isinstance(value, dict) else str(value)


def _template_text(value: Any) -> str | None:
    """tokenizer_config.json's chat_template: a string, or a list of named templates (take 'default')."""
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        return named.get("default")
    return value
