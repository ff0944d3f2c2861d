"""A stored chunk verifies or raises: corrupt, truncated, another key's, another prefix's, another model's."""

from __future__ import annotations

import hashlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvcache.tiers.chunk import ChunkError, decode, encode

KEY = hashlib.sha256(b"k").digest()
META = {"model": "m1", "pool": "p1"}
TOKENS = list(range(100, 116))


def tensors():
    torch.manual_seed(0)
    return {"k": torch.randn(2, 3, 16, 8), "v": torch.randn(2, 3, 16, 8).to(torch.bfloat16),
            "kc": torch.randint(0, 255, (2, 3, 4, 8), dtype=torch.uint8)}


def test_round_trip_is_bitwise():
    src = tensors()
    out = decode(encode(KEY, META, TOKENS, src), KEY, META, TOKENS)
    assert list(out) == list(src)
    for name in src:
        assert out[name].dtype == src[name].dtype and torch.equal(out[name], src[name])


@pytest.mark.parametrize("break_it, message", [
    (lambda d: d[:-1], "payload"),
    (lambda d: d[:20], "header"),
    (lambda d: b"XXXX" + d[4:], "magic"),
    (lambda d: d[:-5] + bytes([d[-5] ^ 1]) + d[-4:], "checksum"),
    (lambda d: b"", "magic"),
    (lambda d: d + b"\0", "payload"),
])
def test_damaged_bytes_are_refused(break_it, message):
    with pytest.raises(ChunkError, match=message):
        decode(break_it(encode(KEY, META, TOKENS, tensors())), KEY, META, TOKENS)


def test_wrong_key_tokens_or_identity_are_refused():
    data = encode(KEY, META, TOKENS, tensors())
    with pytest.raises(ChunkError, match="key"):
        decode(data, hashlib.sha256(b"other").digest(), META, TOKENS)
    with pytest.raises(ChunkError, match="token"):
        decode(data, KEY, META, TOKENS[:-1] + [7])
    with pytest.raises(ChunkError, match="model"):
        decode(data, KEY, {**META, "model": "m2"}, TOKENS)
    with pytest.raises(ChunkError, match="pool"):
        decode(data, KEY, {**META, "pool": "int8"}, TOKENS)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_any_flipped_byte_is_refused(data):
    blob = bytearray(encode(KEY, META, TOKENS, tensors()))
    i = data.draw(st.integers(0, len(blob) - 1))
    blob[i] ^= data.draw(st.integers(1, 255))
    with pytest.raises(ChunkError):
        decode(bytes(blob), KEY, META, TOKENS)
