"""The encoders' embedding cache: one parquet file per model, one row per input
keyed by a content hash of (model name, text) or (model name, image bytes),
so a rerun, or a run on a catalog that shares most items, encodes only what is
new. The cache is the one file access of `distill` outside `distill/jobs/`
(plus reading the image files themselves).
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from features.core.manifest import atomic_file, write_parquet

DEFAULT_CACHE_DIR = Path.home() / ".cache" / "recsys-plugin" / "encoders"

# An encoder maps a list of inputs to an (n, dim) float32 array. Tests inject
# counting fakes; the real ones load their weights from installed packages.
EncodeFn = Callable[[list], np.ndarray]


def default_cache_dir() -> Path:
    """$RECSYS_CACHE_DIR/encoders, else ~/.cache/recsys-plugin/encoders: shared by
    every output folder so that a new run does not re-encode the same texts."""
    env = os.environ.get("RECSYS_CACHE_DIR")
    return Path(env) / "encoders" if env else DEFAULT_CACHE_DIR


def content_key(model: str, payload: str | bytes) -> str:
    """Cache key of one input: blake2b over the model name and the content."""
    h = hashlib.blake2b(digest_size=16)
    h.update(model.encode())
    h.update(b"\0")
    h.update(payload.encode() if isinstance(payload, str) else payload)
    return h.hexdigest()


class EmbeddingCache:
    """One parquet file per model: columns `key` (String), `embedding` (List(Float32)).

    Writes go to a temp file renamed over the old one, so a killed run leaves
    the old cache intact; two concurrent writers can lose each other's new rows
    (they are re-encoded next time), never corrupt the file.
    """

    def __init__(self, folder: str | Path, model: str) -> None:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in model)
        self.path = Path(folder) / f"{safe}.parquet"

    def _read(self) -> pl.DataFrame:
        empty = pl.DataFrame(schema={"key": pl.String, "embedding": pl.List(pl.Float32)})
        if not self.path.is_file():
            return empty
        try:
            df = pl.read_parquet(self.path)
        except Exception:  # a corrupt cache is only a cache: start over
            return empty
        if df.schema.get("key") != pl.String or not (isinstance(df.schema.get("embedding"), pl.List)
                                                     and df.schema["embedding"].inner.is_numeric()):
            _warn(f"{self.path}: not an embedding cache (columns {dict(df.schema)}); starting it over")
            return empty
        return df.select("key", pl.col("embedding").cast(pl.List(pl.Float32)))

    def get(self, keys: Sequence[str], dim: int | None = None, unit_norm: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """(found mask (n,), vectors (n, dim) with zeros where not found, or None if nothing found).

        A cached row that is null, of another length than `dim` (the
        encoder's, where known; else the file's usual length), or holds
        NaN/inf, or (`unit_norm`: an L2-normalising encoder) whose norm is
        not 1, is no vector: its input counts as not found (and is encoded
        again), with a warning naming the file. Each was fed to the student
        before: a NaN as a NaN embedding, a file of 100-long rows as a
        100-dimensional text input."""
        df = self._read()
        found = np.zeros(len(keys), dtype=bool)
        if df.height == 0:
            return found, None
        lengths = df["embedding"].list.len()
        if dim is None and lengths.null_count() < df.height:
            dim = lengths.drop_nulls().mode().max()
        ok = (lengths == dim).fill_null(False) & df["embedding"].list.eval(pl.element().is_finite().all()).list.first().fill_null(False)
        if unit_norm:  # a zero row, or one of 1e30, is not what the encoder gives
            norm = df["embedding"].list.eval(pl.element().cast(pl.Float64).pow(2).sum().sqrt()).list.first()
            ok = ok & ((norm - 1).abs() < 1e-3).fill_null(False)
        if not ok.all():
            _warn(f"{self.path}: {int((~ok).sum())} of {df.height} cached vectors are null, of another length than "
                  f"{dim}, not finite{', or not of norm 1' if unit_norm else ''}; their inputs are encoded again")
            df = df.filter(ok)
        pos = {k: i for i, k in enumerate(df["key"].to_list())}
        rows = np.array([pos.get(k, -1) for k in keys], dtype=np.int64)
        found = rows >= 0
        if not found.any():
            return found, None
        table = np.asarray(df["embedding"].to_list(), dtype=np.float32)  # (cached, dim)
        out = np.zeros((len(keys), table.shape[1]), dtype=np.float32)
        out[found] = table[rows[found]]
        return found, out

    def put(self, keys: Sequence[str], vectors: np.ndarray) -> None:
        if len(keys) == 0:
            return
        new = pl.DataFrame(
            {"key": list(keys), "embedding": pl.Series(vectors.astype(np.float32).tolist(), dtype=pl.List(pl.Float32))}
        )
        old = self._read()
        if old.height and old["embedding"].list.len().max() != vectors.shape[1]:
            old = old.clear()  # another model version wrote a different dim
        df = pl.concat([old, new]).unique("key", keep="last", maintain_order=True)
        with atomic_file(self.path) as tmp:
            write_parquet(df, tmp)


@dataclass
class EncodeStats:
    """What an encoding call did (the benchmark reports it)."""

    n: int = 0
    n_encoded: int = 0  # inputs that missed the cache
    seconds: float = 0.0

    @property
    def cache_hit(self) -> bool:
        return self.n_encoded == 0



def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def cached_encode(
    inputs: list,
    keys: list[str],
    encode: EncodeFn,
    cache: EmbeddingCache | None,
    batch_size: int,
    progress: bool,
    desc: str,
    dim: int | None = None,
    unit_norm: bool = False,
) -> tuple[np.ndarray, EncodeStats]:
    """Vectors (n, dim) of `inputs` (cache key `keys[i]` each): cached rows
    read, the rest encoded in batches of `batch_size` (each distinct key
    once) and added to the cache. `dim`: the encoder's output length where
    known (cached rows of another length are encoded again); `unit_norm`:
    the encoder L2-normalises (cached rows of another norm are encoded again)."""
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    if cache is not None:
        found, vectors = cache.get(keys, dim, unit_norm)
    else:
        found, vectors = np.zeros(len(keys), dtype=bool), None
    todo = np.flatnonzero(~found)
    # a catalog repeats texts (remakes, identical descriptions): encode each once
    uniq: dict[str, int] = {}
    for i in todo:
        uniq.setdefault(keys[i], int(i))
    first = np.fromiter(uniq.values(), dtype=np.int64, count=len(uniq))
    if len(first):
        chunks = []
        for s in tqdm(range(0, len(first), batch_size), desc=desc, unit="batch", disable=None if progress else True):
            idx = first[s : s + batch_size]
            chunks.append(np.asarray(encode([inputs[i] for i in idx]), dtype=np.float32))
        fresh = np.concatenate(chunks)  # (len(first), dim)
        if vectors is None:
            vectors = np.zeros((len(keys), fresh.shape[1]), dtype=np.float32)
        row_of = {keys[i]: r for r, i in enumerate(first)}
        for i in todo:
            vectors[i] = fresh[row_of[keys[i]]]
        if cache is not None:
            cache.put([keys[i] for i in first], fresh)
    if vectors is None:  # no inputs at all
        vectors = np.zeros((0, 0), dtype=np.float32)
    return vectors, EncodeStats(len(keys), len(first), time.perf_counter() - t0)


__all__ = ["DEFAULT_CACHE_DIR", "EncodeFn", "EmbeddingCache", "EncodeStats", "cached_encode", "content_key", "default_cache_dir"]
