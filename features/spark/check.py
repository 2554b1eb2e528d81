"""`python -m features.spark.check`: the Spark engine's output equals the
polars engine's on MovieLens-100K, for the feature build and the match job
(same bytes, and row for row after a sort, every column). Exit 0 on PASS.

    python -m features.spark.check [--source movielens100k] [--dim 32] [--keep DIR]

The match job uses random item vectors (seeded): equality does not depend
on what the vectors mean.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl
from polars.testing import assert_frame_equal

from features import schemas as S

SORT = [S.USER_ID, S.TIMESTAMP, S.ITEM_ID]


def compare(a: Path, b: Path, files: list[str]) -> list[str]:
    """Problems found between two output folders ([] when equal)."""
    problems = []
    ma, mb = (json.loads((d / "manifest.json").read_text()) for d in (a, b))
    for f in files:
        if ma["outputs"][f]["fingerprint"] != mb["outputs"][f]["fingerprint"]:
            problems.append(f"{f}: different bytes")
        x, y = pl.read_parquet(a / f), pl.read_parquet(b / f)
        keys = [c for c in SORT if c in x.columns] or [x.columns[0]]
        try:
            assert_frame_equal(x.sort(keys), y.sort(keys))
        except AssertionError as e:
            problems.append(f"{f}: {str(e).splitlines()[0]}")
    return problems


def main(argv: list[str] | None = None) -> int:
    from features.jobs import FeaturesConfig, build_features, build_match_features
    from features.match import MatchConfig

    p = argparse.ArgumentParser(prog="python -m features.spark.check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", default="movielens100k", choices=["movielens100k", "movielens1m"])
    p.add_argument("--dim", type=int, default=32, help="dimension of the random item vectors")
    p.add_argument("--keep", help="write the four output folders here instead of a temp folder")
    args = p.parse_args(argv)
    quiet = dict(log=lambda _m: None)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.keep or tmp)
        cfg, mcfg = FeaturesConfig(source=args.source), MatchConfig()
        secs = {}
        for engine in ("polars", "spark"):
            t = time.perf_counter()
            build_features(dataclasses.replace(cfg, engine=engine), root / f"features-{engine}", force=True, **quiet)
            secs[f"build {engine}"] = time.perf_counter() - t
        files = [f for f in json.loads((root / "features-polars" / "manifest.json").read_text())["outputs"]]
        problems = compare(root / "features-polars", root / "features-spark", files)
        ids = pl.read_parquet(root / "features-polars" / "items.parquet")[S.ITEM_ID].to_numpy()
        vec = np.random.default_rng(0).standard_normal((len(ids), args.dim)).astype(np.float32)
        emb = root / "embeddings.parquet"
        pl.DataFrame({S.ITEM_ID: ids, "embedding": pl.Series(list(vec), dtype=pl.List(pl.Float32))}).write_parquet(emb)
        for engine in ("polars", "spark"):
            t = time.perf_counter()
            build_match_features(root / f"features-{engine}", emb, root / f"match-{engine}",
                                 dataclasses.replace(mcfg, engine=engine), force=True, progress=False, **quiet)
            secs[f"match {engine}"] = time.perf_counter() - t
        problems += compare(root / "match-polars", root / "match-spark", [S.MATCH_FILE])
    print(f"{args.source}: " + ", ".join(f"{k} {v:.1f}s" for k, v in secs.items()))
    print(f"files compared: {', '.join(files)}, {S.MATCH_FILE}")
    if problems:
        print("FAIL: the engines differ:\n  " + "\n  ".join(problems))
        return 1
    print("PASS: the spark outputs equal the polars outputs (same bytes; row for row, every column)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
