"""Content fingerprints: what a rerun compares to decide whether inputs changed."""

from __future__ import annotations

import hashlib
from pathlib import Path

import polars as pl


def file_fingerprint(path: str | Path, chunk: int = 1 << 22) -> str:
    """blake2b of a file's bytes (content, not mtime: reruns on a copy still skip)."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def bytes_fingerprint(data: bytes) -> str:
    """`file_fingerprint` of a file whose bytes are `data` (already read)."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def frame_fingerprint(df: pl.DataFrame) -> str:
    """Content hash of an in-memory frame (row hashes, order-sensitive)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(str(df.schema).encode())
    h.update(df.hash_rows(seed=0).to_numpy().tobytes())
    return h.hexdigest()
