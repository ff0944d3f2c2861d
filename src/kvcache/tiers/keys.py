"""Keys that mean the same thing in every process and on every machine.

A chunk's key is SHA-256 chained over the prompt: ``key_i = sha256(key_{i-1} | tokens of chunk i)``, rooted in
a digest of everything that changes the bytes a chunk holds -- the model's identity, the pool's format
(fp32 vs int8 vs int4 codes are different bytes), the chunk and block size, the format version -- and the
request's cache salt.  Python's ``hash()`` is salted per process for strings and is never used here.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

import torch

FORMAT_VERSION = 1
SAMPLE = 4096  # weight values per tensor folded into the model's identity


def model_identity(model) -> str:
    """A digest of the model's config and of each weight's name, shape, dtype and a strided sample of its
    values: two different checkpoints (even random ones of the same shape) get different identities, and
    hashing costs milliseconds, not a pass over every weight."""
    h = hashlib.sha256(repr(model.config).encode())
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // SAMPLE)
        sample = flat[::step][:SAMPLE].contiguous()
        h.update(f"|{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        h.update(sample.view(torch.uint8).numpy().tobytes() if sample.numel() else b"")
    return h.hexdigest()


def pool_identity(pool) -> str:
    """The pool's storage format: its class, spec and the dtype and per-token shape of every stored tensor."""
    parts = [type(pool).__name__, str(pool.spec), str(pool.block_size)]
    for name, (tensor, axis, unit) in sorted(pool.block_tensors().items()):
        shape = list(tensor.shape)
        shape[axis] = unit
        parts.append(f"{name}:{tensor.dtype}:{shape}")
    return "|".join(parts)


def root_key(model_id: str, pool_id: str, chunk_tokens: int, salt: str | None) -> bytes:
    text = f"kvcache-tier-v{FORMAT_VERSION}|{model_id}|{pool_id}|{chunk_tokens}|".encode()
    return hashlib.sha256(text + salt_bytes(salt)).digest()


def salt_bytes(salt: str | None) -> bytes:
    """A cache salt as root-key bytes; no salt and the empty salt differ."""
    return b"\x00" if salt is None else b"\x01" + salt.encode("utf-8")


def chunk_keys(root: bytes, tokens: Sequence[int], chunk_tokens: int, limit: int | None = None) -> list[bytes]:
    """Keys of the prompt's full chunks (at most ``limit``), each standing for the whole prefix up to its end."""
    keys, parent = [], root
    count = len(tokens) // chunk_tokens if limit is None else min(limit, len(tokens) // chunk_tokens)
    for i in range(count):
        parent = next_key(parent, tokens[i * chunk_tokens:(i + 1) * chunk_tokens])
        keys.append(parent)
    return keys


def next_key(parent: bytes, chunk: Sequence[int]) -> bytes:
    """The key of the chunk after the one keyed ``parent`` (or after the ``root``)."""
    return hashlib.sha256(parent + struct.pack(f"<{len(chunk)}q", *chunk)).digest()
