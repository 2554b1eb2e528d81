"""What the distill jobs write and read back: names, the job result, the
embedding tables, checkpoints and the published folder."""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from features import schemas as S
from features.core.errors import DataError
from features.core.fingerprint import file_fingerprint
from features.core.manifest import atomic_outputs, write_manifest
from features.jobs.config import JOB as FEATURES_JOB

VERSION = 2  # bump when the same inputs and config give different outputs
JOB_TEACHERS, JOB_STUDENT, JOB_TRAIN, JOB_EVAL = "distill.teachers", "distill.student", "distill.train", "distill.eval"
EMBEDDINGS = "item_embeddings.parquet"
METRICS = "metrics.json"
TEST_HITS = "test_hits.parquet"  # evaluate: per test impression, hit@k of the models the seed report compares
REASONS = "reasons"  # metrics.json: {metric: why it is null}
NESTED = ("teachers", "student")  # the stage folders inside a distill output that its reuse serves from


@dataclass
class JobResult:
    out_dir: Path
    skipped: bool  # True when an up-to-date output was reused
    manifest: dict[str, Any]
    seconds: float = 0.0
    metrics: dict[str, Any] | None = None  # evaluate only: {name: number, or None when it cannot be computed}, "reasons"


def embedding_frame(item_ids: np.ndarray, emb: np.ndarray, known: np.ndarray | None = None) -> pl.DataFrame:
    cols: dict[str, Any] = {
        S.ITEM_ID: pl.Series(item_ids, dtype=pl.Int64),
        "embedding": pl.Series(np.asarray(emb, dtype=np.float32).tolist(), dtype=pl.List(pl.Float32)),
    }
    if known is not None:
        cols["known"] = pl.Series(known, dtype=pl.Boolean)
    return pl.DataFrame(cols)


def to_torch(obj: Any) -> Any:
    """numpy arrays -> tensors (torch.load(weights_only=True) reads tensors, not arrays)."""
    import torch

    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(obj))
    if isinstance(obj, dict):
        return {k: to_torch(v) for k, v in obj.items()}
    return obj


def load_pt(path: Path) -> dict[str, Any]:
    import torch

    if not path.is_file():
        raise DataError("missing (rerun with --force to rebuild it)", file=str(path))
    try:
        return torch.load(path, weights_only=True)
    except Exception as e:  # truncated or foreign file: torch raises several types
        raise DataError(f"not a readable checkpoint ({type(e).__name__}); rerun with --force to rebuild it", file=str(path)) from e


@contextmanager
def foreign_checkpoint(path: Path) -> Iterator[None]:
    """A readable checkpoint whose content is not what this version wrote."""
    try:
        yield
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        msg = f"checkpoint does not match this version ({type(e).__name__}: {e}); rerun with --force to rebuild it"
        raise DataError(msg, file=str(path)) from e


def log_default(msg: str) -> None:
    """Progress to stdout; warnings to stderr, where they are not lost in the output."""
    print(msg, flush=True, file=sys.stderr if msg.startswith("warning:") else sys.stdout)


def publish(
    out: Path,
    key: dict[str, Any],
    job: str,
    emb_src: Path,
    metrics: dict[str, Any] | None,
    extra: dict[str, Any],
    tables: dict[str, pl.DataFrame] | None = None,
) -> dict:
    from features.core.manifest import write_parquet

    with atomic_outputs(out) as tmp:
        shutil.copyfile(emb_src, tmp / EMBEDDINGS)
        files = {}
        if metrics is not None:
            (tmp / METRICS).write_text(json.dumps(metrics, indent=2, allow_nan=False) + "\n")
            files[METRICS] = file_fingerprint(tmp / METRICS)
        for name, frame in (tables or {}).items():
            write_parquet(frame, tmp / name)
            files[name] = file_fingerprint(tmp / name)
        manifest = write_manifest(tmp, job=job, key=key, outputs=[EMBEDDINGS], extra={"files": files, **extra})
    # `distill train` into a folder `distill eval` wrote: its metrics and hits
    # describe another student, and must not sit beside the new embeddings
    for name in (METRICS, TEST_HITS):
        if name not in files:
            (out / name).unlink(missing_ok=True)
    return manifest


__all__ = [
    "VERSION",
    "JOB_TEACHERS",
    "JOB_STUDENT",
    "JOB_TRAIN",
    "JOB_EVAL",
    "FEATURES_JOB",
    "EMBEDDINGS",
    "METRICS",
    "TEST_HITS",
    "REASONS",
    "JobResult",
    "embedding_frame",
    "foreign_checkpoint",
    "load_pt",
    "log_default",
    "publish",
    "to_torch",
]
