"""Out-of-fold match features: train rows scored by students that never saw their labels.

The student behind `item_embeddings` trains on train-split positives, so the
`mf_*` features of those same train rows are in-sample: a ranker learns an
inflated weight on them (a stacking leak). With `match.folds: K >= 2`:

    1. users are split into K folds by a fixed hash of user_id
       (`features.match.space.stable_shard`, the match job's own shards);
    2. for each fold k, a features view without fold k's users (all their
       rows and sequences; every item kept) is distilled again (teachers and
       student, no ablations, no two-tower), and the match job scores fold k's users with
       those embeddings (shard k of K);
    3. train rows take the features of their user's fold; valid and test rows
       keep the features from the student trained on all of train.

Cost: K more distillations and one more match pass. The manifest records the
time of each part. Outputs: OUT/match_features.parquet + manifest.json (the
final table), OUT/full/ (in-sample, for valid and test), OUT/folds/kK/.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl

from features import schemas as S
from features.core.config import flatten, to_dict
from features.core.errors import UsageError
from features.core.manifest import (
    atomic_outputs,
    folder_fingerprint,
    is_up_to_date,
    output_info,
    read_manifest,
    write_manifest,
    write_parquet,
)
from features.core.provenance import stage_key
from features.core.tracker import NullTracker, Tracker
from features.match.space import stable_shard

JOB = "features.match.oof"


def fold_view(features: Path, k: int, folds: int, out: Path) -> Path:
    """A features folder without the users of fold k, with a manifest like
    the source's (so distillation reads it as a features folder).

    The items table is kept as it is, whole-data columns included
    (n_train_events, cold_item, first_ts): the student draws its test-cold
    and pseudo-cold items from n_train_events, so every fold student hides
    the same items as the student of valid/test rows, and an item's
    features are content-only (or collaborative) on train and test rows
    alike. Recomputing the counts per view changed that draw, and the leak
    check (tests/recsys/test_leak.py) then found train rows' cosines
    significantly weaker than test rows' (mf_cos_max -0.033 [-0.058,
    -0.003]). An item whose train events all came from fold k's users is
    therefore "warm" in the view without a train event there; its
    embedding is the student's content map, as for a hidden item."""
    source = read_manifest(features) or {}
    key = stage_key("features.fold", {"fold": k, "folds": folds}, {"features": folder_fingerprint(features)})
    if is_up_to_date(out, key):
        return out
    with atomic_outputs(out) as tmp:
        written = []
        for name in ("interactions", "sequences", "items", "users"):
            path = features / S.FILES[name]
            if not path.is_file():
                continue
            frame = pl.read_parquet(path)
            if S.USER_ID in frame.columns:
                frame = frame.filter(stable_shard(frame[S.USER_ID].to_numpy(), folds) != k)
            write_parquet(frame, tmp / S.FILES[name])
            written.append(S.FILES[name])
        extra = {k2: v for k2, v in source.items() if k2 not in ("job", "created", "key", "outputs")}
        write_manifest(tmp, job=source.get("job", "features.build"), key=key, outputs=written,
                       extra=extra | {"fold_of": str(features), "fold": [k, folds]})
    return out


def _differences(want: dict[str, Any], got: dict[str, Any], section: str) -> list[str]:
    want, got = flatten(want), flatten(got)
    return [f"{section}.{k}: {got.get(k, '(unset)')!r}, the config says {want.get(k, '(unset)')!r}"
            for k in sorted(set(want) | set(got)) if k.split(".")[-1] != "seed" and want.get(k) != got.get(k)]


def check_embeddings_provenance(job: Any, log: Callable[[str], None] = print) -> None:
    """UsageError unless `job.embeddings` came from `distill eval` on
    `job.features` with the student and teachers the config describes (seeds
    aside): valid and test rows take their features from those embeddings,
    train rows from fold students trained per the config, so any other
    student shifts train rows against valid/test. Embeddings without a
    distill manifest beside them (a file of your own) cannot be checked: a
    warning says so."""
    from distill.config import training_key_of
    from distill.jobs.artifacts import JOB_EVAL, JOB_TRAIN

    emb = Path(job.embeddings)
    made = read_manifest(emb.parent) or {}
    if made.get("job") not in (JOB_EVAL, JOB_TRAIN) or made.get("outputs", {}).get(emb.name) is None:
        log(f"warning: {emb}: no distill manifest beside it, so out-of-fold match cannot check that it came from "
            "the config's distill and teachers sections; the fold students follow the config, and another "
            "student would shift train rows against valid/test")
        return
    if made["job"] == JOB_TRAIN:
        raise UsageError(f"--embeddings {emb} came from `recsys distill train` (every item trained on), but the fold "
                         "students follow `recsys distill eval`'s protocol (test-cold and pseudo-cold items held "
                         "out): pass the item_embeddings.parquet of `recsys distill eval` with the same config")
    wanted = {S.FILES[n] for n in ("interactions", "sequences", "items")}
    ours = {k: v.get("fingerprint") for k, v in (read_manifest(job.features) or {}).get("outputs", {}).items() if k in wanted}
    theirs = {k: v for k, v in made.get("key", {}).get("upstream", {}).items() if k in wanted}
    if ours != theirs:
        raise UsageError(f"--embeddings {emb} was distilled from other features than {job.features}: out-of-fold "
                         "train rows would come from students of these features, valid/test rows from that one")
    diffs = _differences(training_key_of(to_dict(job.oof.distill)), training_key_of(made.get("config", {})), "distill")
    diffs += _differences(to_dict(job.oof.teachers), made.get("teachers", {}), "teachers")
    if diffs:
        shown = "; ".join(diffs[:5]) + (f"; and {len(diffs) - 5} more" if len(diffs) > 5 else "")
        raise UsageError(f"--embeddings {emb} came from a student trained otherwise than the config's (--config) "
                         f"fold students would be ({shown}): valid/test rows would take features from one student, "
                         "train rows from another; rerun `recsys distill eval` with this config, or pass its config")


def oof_match_features(job: Any, tracker: Tracker | None, out: Path, *, force: bool = False,
                       log: Callable[[str], None] = print, progress: bool = True) -> tuple[dict[str, Any], bool]:
    """Run the out-of-fold match job `job` (a MatchJob with `oof` set) into
    `out`; returns its manifest and whether it was up to date (skipped)."""
    from features.jobs import build_match_features, match_shard_dir
    from recsys.stages import run_distill

    tracker = tracker or NullTracker()
    folds = job.config.folds
    users = int(output_info(job.features, S.FILES["sequences"]).get("rows", 0))
    if users and folds > users:  # checked before any work: each fold holds whole users
        raise UsageError(f"match.folds (--folds) {folds}: more folds than the {users:,} users of {job.features}; "
                         f"use at most {users:,}")
    distill = job.oof
    check_embeddings_provenance(job, log)
    key = stage_key(JOB, {"match": job.config.relevant(), "teachers": to_dict(distill.teachers),
                          "distill": to_dict(distill.distill)},
                    {"features": folder_fingerprint(job.features), "embeddings": folder_fingerprint(job.embeddings)})
    if not force and is_up_to_date(out, key):
        log(f"match (out-of-fold): {out} is up to date; skipping")
        return read_manifest(out) or {}, True
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    full = build_match_features(job.features, job.embeddings, out / "full", job.config, force=force, log=log,
                                progress=progress)
    seconds["full_match_s"] = time.perf_counter() - t0
    table = pl.read_parquet(out / "full" / S.MATCH_FILE)
    split = pl.read_parquet(job.features / S.FILES["interactions"], columns=[*S.MATCH_KEYS, S.SPLIT])
    parts = []
    for k in range(folds):
        fold_dir = out / "folds" / f"k{k}"
        t = time.perf_counter()
        view = fold_view(job.features, k, folds, fold_dir / "features")
        # a fold student only feeds match features: no ablations, no two-tower baseline (report-only models)
        fold_job = dataclasses.replace(distill, features=view, ablations=False,
                                       distill=dataclasses.replace(distill.distill, two_tower=False))
        run_distill(fold_job, NullTracker(), fold_dir / "distill", force=force, log=log)
        seconds[f"fold{k}_distill_s"] = time.perf_counter() - t
        t = time.perf_counter()
        build_match_features(job.features, fold_dir / "distill" / "item_embeddings.parquet", fold_dir / "match",
                             job.config, shard=(k, folds), force=force, log=log, progress=progress, only_this_shard=True)
        part = pl.read_parquet(match_shard_dir(fold_dir / "match", k, folds) / S.MATCH_FILE)
        part = part.join(split, on=list(S.MATCH_KEYS), how="left").filter(pl.col(S.SPLIT) == "train").drop(S.SPLIT)
        parts.append(part)
        seconds[f"fold{k}_match_s"] = time.perf_counter() - t
    oof = pl.concat(parts)
    final = table.update(oof, on=list(S.MATCH_KEYS), how="left", include_nulls=True)
    if final.height != table.height or oof.height != split.filter(pl.col(S.SPLIT) == "train").height:
        raise RuntimeError("out-of-fold match features do not cover every train row exactly once")
    seconds["total_s"] = time.perf_counter() - t0
    with atomic_outputs(out) as tmp:  # moves the final files in; full/ and folds/ stay
        write_parquet(final, tmp / S.MATCH_FILE)
        manifest = write_manifest(tmp, job=JOB, key=key, outputs=[S.MATCH_FILE],
                                  extra={"folds": folds, "seconds": seconds, "full": str(full.out_dir),
                                         "train_rows_out_of_fold": oof.height})
    for stale in (out / "folds").glob("k*"):  # folds of an earlier run into `out` with more folds
        if stale.name[1:].isdigit() and int(stale.name[1:]) >= folds:
            shutil.rmtree(stale, ignore_errors=True)
    tracker.log_metrics({f"oof_{k}": v for k, v in seconds.items()})
    log(f"match (out-of-fold, {folds} folds): {oof.height:,} train rows from fold students in "
        f"{seconds['total_s']:.1f}s -> {out / S.MATCH_FILE}")
    return manifest, False


__all__ = ["JOB", "check_embeddings_provenance", "fold_view", "oof_match_features"]
