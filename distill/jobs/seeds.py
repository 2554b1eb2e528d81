"""The multi-seed evaluation job: one `evaluate` per seed into OUT/seed_{s},
then OUT/seeds.json: per-seed numbers, their mean and spread, and paired
bootstrap intervals of the student's cold Recall@k against raw content and
against the content-only two-tower (distill/evaluate/seeds.py)."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from distill.config import DistillConfig, TeachersConfig
from distill.evaluate.seeds import bootstrap_ratio, summarise
from distill.jobs.artifacts import TEST_HITS, log_default
from distill.jobs.evaluation import evaluate
from features.core.errors import UsageError
from features.core.manifest import atomic_outputs
from features.core.numeric import json_safe
from features.core.tracker import NullTracker, Tracker

SEEDS = "seeds.json"
MODELS = ("student", "content", "two_tower", "id_teacher")
RATIOS = {"student_vs_content": ("student", "content"), "student_vs_two_tower": ("student", "two_tower")}


def _keys(k: int) -> list[str]:
    return [f"recall@{k}_{g}_{m}" for g in ("cold", "warm") for m in MODELS if not (g == "cold" and m == "id_teacher")]


def seeds_report(per_seed: dict[int, dict[str, Any]], hits: dict[int, pl.DataFrame], k: int, n_boot: int = 2000) -> dict[str, Any]:
    """Per-seed metrics, their spread, and for each ratio of RATIOS: the
    per-seed ratio of cold Recall@k, its spread, and the pooled paired
    bootstrap interval (users and seeds resampled; users only beside it)."""
    rng = np.random.default_rng(0)  # the interval's own randomness, fixed so a rerun prints the same
    keys = _keys(k)
    out: dict[str, Any] = {
        "k": k,
        "seeds": sorted(per_seed),
        "per_seed": {str(s): {key: m.get(key) for key in keys} for s, m in per_seed.items()},
        "summary": summarise(per_seed, keys),
        "ratios": {},
    }
    frames = [h.filter(pl.col("cold")).with_columns(pl.lit(s).alias("seed")) for s, h in hits.items()]
    cold = pl.concat(frames, how="diagonal") if frames else pl.DataFrame()
    for name, (a, b) in RATIOS.items():
        if cold.is_empty() or f"hit_{a}" not in cold.columns or f"hit_{b}" not in cold.columns:
            continue
        per = {}
        for s in per_seed:
            va, vb = per_seed[s].get(f"recall@{k}_cold_{a}"), per_seed[s].get(f"recall@{k}_cold_{b}")
            per[s] = va / vb if va is not None and vb else float("nan")
        args = (cold[f"hit_{a}"].to_numpy(), cold[f"hit_{b}"].to_numpy(), cold["user_id"].to_numpy(), cold["seed"].to_numpy())
        out["ratios"][name] = {
            "per_seed": {str(s): v for s, v in per.items()},
            "spread": summarise({s: {"r": v} for s, v in per.items()}, ["r"]).get("r"),
            "pooled_ci_users_seeds": bootstrap_ratio(*args, n_boot=n_boot, rng=rng),
            "pooled_ci_users": bootstrap_ratio(*args, n_boot=n_boot, rng=rng, resample_seeds=False),
        }
    return out


def evaluate_seeds(
    features_dir: str | Path,
    out_dir: str | Path,
    cfg: DistillConfig = DistillConfig(),
    tracker: Tracker | None = None,
    *,
    teachers: TeachersConfig = TeachersConfig(),
    seeds: Sequence[int] = (0, 1, 2),
    ablations: bool = False,
    force: bool = False,
    log: Callable[[str], None] = log_default,
) -> dict[str, Any]:
    """`evaluate` once per seed (the configs' own seeds are overridden) into
    OUT/seed_{s}; writes and returns OUT/seeds.json's content."""
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise UsageError(f"--seeds needs distinct seeds >= 0, got {list(seeds)}")
    t0 = time.perf_counter()
    out = Path(out_dir)
    cfg, teachers = dataclasses.replace(cfg, seed=None), dataclasses.replace(teachers, seed=None)
    per_seed, hits = {}, {}
    for s in seeds:
        # each seed's own run logs nothing: one tracking run cannot hold one param with several values
        res = evaluate(features_dir, out / f"seed_{s}", cfg, NullTracker(), teachers=teachers, ablations=ablations, seed=s, force=force, log=log)
        per_seed[s] = res.metrics or {}
        hits[s] = pl.read_parquet(res.out_dir / TEST_HITS)
    k = 50 if 50 in cfg.eval_ks else max(cfg.eval_ks)
    report = json_safe(seeds_report(per_seed, hits, k))
    report["seconds"] = time.perf_counter() - t0
    with atomic_outputs(out) as tmp:
        (tmp / SEEDS).write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    if tracker is not None:
        flat = {f"seeds/{key}_{stat}": v for key, st in report["summary"].items() for stat, v in st.items() if isinstance(v, float)}
        for name, r in report["ratios"].items():
            flat.update({f"seeds/{name}_{kk}": v for kk, v in r["pooled_ci_users_seeds"].items() if isinstance(v, float)})
        tracker.log_metrics(flat)
        tracker.log_artifact(out / SEEDS)
    log(f"distill eval: wrote {out / SEEDS} ({len(seeds)} seeds) in {report['seconds']:.1f}s")
    return report


__all__ = ["SEEDS", "seeds_report", "evaluate_seeds"]
