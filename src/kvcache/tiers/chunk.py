"""A stored chunk: self-describing and verified.

    b"KVC1" | u32 header length | header (JSON) | payload

The header names the format version, the key, the model and pool identities, the chunk's token ids, and
every tensor's name, dtype and shape; ``sha256`` covers the header's other fields and the payload.  A chunk
whose magic, header, key, tokens, tensors or checksum do not match what the reader expects raises
``ChunkError``: the caller counts it as a miss and computes the tokens, so wrong KV is never used.
Quantized pools store their codes and scales as they are.
"""

from __future__ import annotations

import hashlib
import json
import struct

import torch

from .keys import FORMAT_VERSION

MAGIC = b"KVC1"


class ChunkError(ValueError):
    """A stored chunk that does not verify (corrupt, truncated, another model's, another prefix's)."""


def encode(key: bytes, meta: dict, tokens: list[int], tensors: dict[str, torch.Tensor]) -> bytes:
    """``meta``: the identities the reader will check (model, pool)."""
    payload = [t.contiguous().view(torch.uint8).reshape(-1).numpy().tobytes() for t in tensors.values()]
    header = {"version": FORMAT_VERSION, "key": key.hex(), **meta, "tokens": list(tokens),
              "tensors": [[n, str(t.dtype).removeprefix("torch."), list(t.shape)] for n, t in tensors.items()]}
    header["sha256"] = _digest(header, payload)
    head = json.dumps(header, separators=(",", ":")).encode()
    return b"".join([MAGIC, struct.pack("<I", len(head)), head, *payload])


def decode(data: bytes, key: bytes, meta: dict, tokens: list[int]) -> dict[str, torch.Tensor]:
    """The chunk's tensors, or ``ChunkError`` naming the first thing that does not match."""
    if len(data) < 8 or data[:4] != MAGIC:
        raise ChunkError("not a kvcache chunk (bad magic)")
    (size,) = struct.unpack_from("<I", data, 4)
    try:
        header = json.loads(data[8:8 + size])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ChunkError(f"unreadable header: {exc}") from None
    if not isinstance(header, dict) or header.get("version") != FORMAT_VERSION:
        raise ChunkError(f"format version {header.get('version') if isinstance(header, dict) else '?'}, "
                         f"expected {FORMAT_VERSION}")
    if header.get("key") != key.hex():
        raise ChunkError("stored under another key")
    for name, value in meta.items():
        if header.get(name) != value:
            raise ChunkError(f"{name} identity differs")
    if header.get("tokens") != list(tokens):
        raise ChunkError("token ids differ")
    specs, offset, views = header.get("tensors") or [], 8 + size, []
    try:
        for name, dtype, shape in specs:
            dt = getattr(torch, dtype)
            nbytes = torch.Size(shape).numel() * torch.empty(0, dtype=dt).element_size()
            views.append((name, dt, shape, data[offset:offset + nbytes]))
            offset += nbytes
    except (TypeError, ValueError, AttributeError) as exc:
        raise ChunkError(f"bad tensor list: {exc}") from None
    if offset != len(data):
        raise ChunkError(f"payload is {len(data) - 8 - size} bytes, the header describes {offset - 8 - size}")
    if header.get("sha256") != _digest(header, [v[3] for v in views]):
        raise ChunkError("checksum mismatch")
    return {name: torch.frombuffer(bytearray(raw), dtype=dt).reshape(shape) for name, dt, shape, raw in views}


def _digest(header: dict, payload: list[bytes]) -> str:
    h = hashlib.sha256(json.dumps({k: v for k, v in header.items() if k != "sha256"}, sort_keys=True).encode())
    for part in payload:
        h.update(part)
    return h.hexdigest()
