"""Fixtures of the bad-input and fault suite.

`cli(*argv)` runs `recsys` in-process and returns (rc, stdout, stderr); it
fails the test on any Python traceback, since a user error must be one
`error:` line. `tiny_dataset(...)` writes a small ordinary files-source
dataset (parquet) and returns its paths. `snapshot(dir)` maps every file under
a folder to its bytes, to assert that an input is byte-identical after a run.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pytest


@dataclass
class CliResult:
    rc: int
    out: str
    err: str

    def __iter__(self):
        return iter((self.rc, self.out, self.err))


@pytest.fixture
def cli(capsys):
    from recsys.cli import main

    def run(*argv: str) -> CliResult:
        capsys.readouterr()
        try:
            rc = main([str(a) for a in argv])
        except SystemExit as e:  # argparse usage errors
            rc = e.code if isinstance(e.code, int) else 2
        cap = capsys.readouterr()
        assert "Traceback (most recent call last)" not in cap.err, cap.err
        return CliResult(rc, cap.out, cap.err)

    return run


def snapshot(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under `folder` (hidden ones too)."""
    folder = Path(folder)
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@dataclass
class TinyDataset:
    dir: Path
    interactions: Path
    items: Path


def write_tiny_dataset(
    folder: Path,
    *,
    users: int = 20,
    items: int = 30,
    events_per_user: int = 12,
    days: int = 30,
    seed: int = 0,
    timestamp_scale: int = 1,
    fmt: str = "parquet",
) -> TinyDataset:
    """An ordinary small dataset: `users` users, each rating
    `events_per_user` items over `days` days; items with a title text and a
    genre. `timestamp_scale` 1000 writes milliseconds instead of seconds."""
    rng = np.random.default_rng(seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    t0 = 1_600_000_000
    for u in range(users):
        chosen = rng.choice(items, size=min(events_per_user, items), replace=False)
        times = np.sort(rng.integers(0, days * 86_400, size=chosen.size))
        for it, t in zip(chosen, times):
            rows.append((u + 1, int(it) + 1, (t0 + int(t)) * timestamp_scale, float(rng.integers(1, 6))))
    inter = pl.DataFrame(
        rows,
        schema={"user_id": pl.Int64, "item_id": pl.Int64, "timestamp": pl.Int64, "rating": pl.Float64},
        orient="row",
    )
    genres = ["drama", "comedy", "action", "horror", "romance"]
    item_df = pl.DataFrame(
        {
            "item_id": np.arange(1, items + 1, dtype=np.int64),
            "text": [f"Movie number {i} about {genres[i % 5]} and friends" for i in range(1, items + 1)],
            "genre": [genres[i % 5] for i in range(1, items + 1)],
        }
    )
    if fmt == "csv":
        ip, tp = folder / "interactions.csv", folder / "items.csv"
        inter.write_csv(ip)
        item_df.write_csv(tp)
    else:
        ip, tp = folder / "interactions.parquet", folder / "items.parquet"
        inter.write_parquet(ip)
        item_df.write_parquet(tp)
    return TinyDataset(folder, ip, tp)


@pytest.fixture
def tiny_dataset(tmp_path):
    return write_tiny_dataset(tmp_path / "data")
