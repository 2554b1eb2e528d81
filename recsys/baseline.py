"""The LightGBM baseline job: reads a features folder (and match features),
trains `recsys.models.lightgbm_ranker.LightGBMRanker`, writes its report.

Two models per run, both trained on the train split with early stopping on
valid and scored on test (hyper-parameters are never chosen on test):

    click model  label            -> `score` (click probability)
    LT model     returned_1d      -> `lt_score` (rows with lt_observed only:
                                     a censored label is not a negative)

`run_lightgbm` writes metrics.json, predictions.parquet (the columns every
model writes, see recsys.eval.metrics) and a gain feature-importance PNG, and
logs through a `features.core.tracker.Tracker`. `match_lift` runs it with and
without the match features and reports the test-GAUC delta with a paired
bootstrap interval over users.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from features import schemas as S
from features.core.config import config_hash, flatten, to_dict
from features.core.errors import ConfigError, DataError, SchemaError, UsageError
from features.core.fingerprint import file_fingerprint
from features.core.manifest import atomic_outputs, atomic_write_text, folder_fingerprint, write_manifest, write_parquet
from features.core.provenance import stage_key
from features.core.numeric import json_safe
from features.core.tracker import NullTracker, Tracker
from features.reader import check_match_upstream, read_table
from features.schemas import MATCH_FILE, MATCH_KEYS, MATCH_PREFIX
from recsys import plots
from recsys.config.sections import LightGBMConfig
from recsys.models.lightgbm_ranker import LightGBMRanker, add_rate_features

JOB = "baseline.lightgbm"
PREDICTIONS, METRICS_FILE = S.PREDICTIONS_FILE, S.METRICS_FILE
IMPORTANCE_PNG = "feature_importance.png"
PREDICTION_COLUMNS = [
    S.USER_ID, S.ITEM_ID, S.TIMESTAMP, S.LABEL, "score", "lt_score", S.RETURNED_1D, S.ACTIVE_DAYS_7,
]

# interactions.parquet columns the baseline reads (features.schemas names)
_NEEDED = (S.USER_ID, S.ITEM_ID, S.TIMESTAMP, S.LABEL, S.SPLIT, S.ITEM_POP, S.HIST_END, S.HIST_LEN, S.POS_HIST_LEN,
           S.POS_HIST_END, S.RETURNED_1D, S.ACTIVE_DAYS_7, S.LT_OBSERVED)


def check_inputs(features_dir: str | Path, match_dir: str | Path | None) -> tuple[Path, Path | None]:
    """(interactions file, match file or None); a UsageError (exit 2) before
    any work when a requested one is absent."""
    feats = Path(features_dir)
    inter_file = feats / S.FILES["interactions"]
    if not inter_file.is_file():
        raise UsageError(f"{feats} is not a features folder (no {S.FILES['interactions']}); run `recsys features build`")
    if match_dir is None:
        return inter_file, None
    mfile = Path(match_dir) / MATCH_FILE
    if not mfile.is_file():
        raise UsageError(f"--match-features: {mfile} does not exist; run `recsys features match` (or pass --no-match)")
    return inter_file, mfile


def load_table(features_dir: str | Path, match_dir: str | Path | None) -> tuple[pl.DataFrame, list[str]]:
    """interactions.parquet with the rate features and the mf_* columns of
    `match_dir` attached (checked row by row: same user_id, item_id,
    timestamp, same order)."""
    inter_file, mfile = check_inputs(features_dir, match_dir)
    inter = read_table(inter_file, "interactions", _NEEDED)
    try:
        inter = inter.lazy().pipe(add_rate_features).collect()
    except pl.exceptions.PolarsError as e:
        raise DataError(f"cannot be read as a features table: {str(e).strip().splitlines()[0]}",
                        file=str(inter_file)) from e
    if mfile is None:
        return inter, []
    mf = read_table(mfile, "match", MATCH_KEYS)
    check_match_upstream(mfile, features_dir)
    keys = list(MATCH_KEYS)
    if mf.height != inter.height or not mf.select(keys).equals(inter.select(keys)):
        raise DataError(
            f"match features do not line up with {inter_file} ({mf.height:,} vs {inter.height:,} rows, or another "
            "order): rebuild them from these features",
            file=str(mfile),
            column=",".join(keys),
        )
    mcols = [c for c in mf.columns if c.startswith(MATCH_PREFIX)]
    if not mcols:
        raise SchemaError(f"no {MATCH_PREFIX}* columns (found: {', '.join(mf.columns)})", file=str(mfile),
                          column=f"{MATCH_PREFIX}*")
    return inter.hstack(mf.select(mcols)), mcols


def _metrics(
    frame: pl.DataFrame, score: np.ndarray, lt_score: np.ndarray | None, reasons: dict[str, str], prefix: str = "",
    lt_missing: str = "",
) -> dict[str, float]:
    """Test (or `prefix`ed valid) metrics from `recsys.eval.metrics.evaluate_predictions`;
    each NaN one gets its reason in `reasons`. `lt_missing`: why there is no LT model."""
    from recsys.eval.metrics import METRICS, evaluate_predictions

    pred = frame.select(S.USER_ID, S.LABEL, S.RETURNED_1D, S.ACTIVE_DAYS_7, S.LT_OBSERVED, S.HIST_LEN).with_columns(
        pl.Series("score", score, dtype=pl.Float64),
        pl.Series("lt_score", lt_score if lt_score is not None else np.zeros(frame.height), dtype=pl.Float64),
    )
    ev = evaluate_predictions(pred)
    for name, why in ev["reasons"].items():
        reasons[f"{prefix}{name}"] = lt_missing if lt_score is None and METRICS[name].score == "lt_score" else why
    if lt_score is None:
        for name, metric in METRICS.items():
            if metric.score == "lt_score":
                ev[name] = float("nan")
                reasons[f"{prefix}{name}"] = lt_missing
    return {f"{prefix}{name}": ev[name] for name in METRICS}


def lightgbm_key(features_dir: str | Path, match: str | Path | None, cfg: LightGBMConfig) -> dict[str, Any]:
    """The manifest key of a LightGBM run: its config, the features' and the
    match file's fingerprints, the plugin's code."""
    up = {"features": folder_fingerprint(features_dir)}
    if match is not None:
        up["match_features"] = file_fingerprint(S.match_file(match))
    return stage_key(JOB, {"config": to_dict(cfg)}, up)


def run_lightgbm(
    features_dir: str | Path,
    match_dir: str | Path | None,
    out_dir: str | Path,
    cfg: LightGBMConfig | None = None,
    tracker: Tracker | None = None,
    *,
    log: Callable[[str], None] = print,
    key: dict[str, Any] | None = None,
) -> dict[str, float]:
    """Train on train, early-stop on valid, score test; write metrics.json,
    predictions.parquet, feature_importance.png (+ manifest.json) to `out_dir`
    atomically. Returns the test metrics (auc, gauc, logloss, lt_auc,
    lt_spearman) plus the same on valid (`valid_*`) and the tree counts."""
    t0 = time.perf_counter()
    cfg = cfg or LightGBMConfig()
    tracker = tracker or NullTracker()
    frame, mcols = load_table(features_dir, match_dir if cfg.use_match_features else None)
    features = cfg.base_features() + mcols
    if not features:
        raise ConfigError("lightgbm: every feature switch is off and no match features are given")
    split = frame[S.SPLIT]
    tr, va, te = (frame.filter(split == s) for s in S.SPLITS)
    if mcols:
        from recsys.data.dense import empty_match_warning

        note = empty_match_warning(mcols, tr.select(pl.col(c).cast(pl.Float64).fill_null(np.nan) for c in mcols).to_numpy(),
                                   str(S.match_file(match_dir)))
        if note:
            log(note)
    inter_file = str(Path(features_dir) / S.FILES["interactions"])
    if min(tr.height, va.height, te.height) == 0:
        raise DataError("lightgbm needs rows in train, valid and test", file=inter_file, column=S.SPLIT)
    if tr[S.LABEL].n_unique() < 2:
        raise DataError(
            f"every train row has {S.LABEL} = {tr[S.LABEL][0]} ({tr.height} rows): nothing to learn "
            "(ratings: check features.label_threshold of `recsys features build`; implicit data: add the "
            "impressions that were not clicked, label 0)",
            file=inter_file, column=S.LABEL,
        )

    def fit(train: pl.DataFrame, valid: pl.DataFrame, label: str, model_cfg: LightGBMConfig = cfg) -> LightGBMRanker:
        return LightGBMRanker(model_cfg).fit(
            train.select(features), train[label].to_numpy(), eval_set=(valid.select(features), valid[label].to_numpy()),
            groups=train[S.USER_ID].to_numpy(), eval_groups=valid[S.USER_ID].to_numpy(),
        )

    click = fit(tr, va, S.LABEL)
    prob = lambda m, f: m.predict_proba(f.select(features))[:, 1]  # noqa: E731
    lt, lt_missing = None, "lightgbm.lt_model is false"
    if cfg.lt_model:
        tr_lt, va_lt = tr.filter(pl.col(S.LT_OBSERVED)), va.filter(pl.col(S.LT_OBSERVED))
        if not tr_lt.height or not va_lt.height:
            lt_missing = f"no LT model: no observed LT rows in {'train' if not tr_lt.height else 'valid'}"
        elif tr_lt[S.RETURNED_1D].n_unique() < 2:
            lt_missing = f"no LT model: {S.RETURNED_1D} has one class only on the observed train rows"
        else:
            # always binary: the LT proxy is the user's return, mostly one class within a user, where lambdarank
            # (which ranks within a user) learns nothing; and lt_auc / lt_spearman pool users
            lt = fit(tr_lt, va_lt, S.RETURNED_1D, dataclasses.replace(cfg, objective="binary"))
    for model, what in ((click, S.LABEL), (lt, S.RETURNED_1D)):
        if model is not None and model.no_early_stop_:
            log(f"warning: lightgbm: {model.no_early_stop_} ({what}): valid cannot tell iterations apart, so there is "
                f"no early stopping; all {model.best_iteration_} trees are kept (lightgbm.n_estimators)")
    score, lt_score = prob(click, te), (prob(lt, te) if lt is not None else None)
    reasons: dict[str, str] = {}
    metrics = _metrics(te, score, lt_score, reasons, lt_missing=lt_missing)
    metrics |= _metrics(va, prob(click, va), prob(lt, va) if lt is not None else None, reasons, prefix="valid_",
                        lt_missing=lt_missing)
    if cfg.objective == "lambdarank":  # a ranking score, squashed: no probability to take a logloss of
        from recsys.eval.metrics import METRICS as ALL

        for prefix in ("", "valid_"):
            for name in (n for n, m in ALL.items() if m.kind == "logloss"):
                metrics[f"{prefix}{name}"] = float("nan")
                reasons[f"{prefix}{name}"] = ("lightgbm.objective lambdarank ranks each user's impressions: its scores "
                                              "are not probabilities")
    metrics |= {"best_iteration": click.best_iteration_, "lt_best_iteration": lt.best_iteration_ if lt is not None else 0}

    preds = te.select(S.USER_ID, S.ITEM_ID, S.TIMESTAMP, S.LABEL).with_columns(
        pl.Series("score", score, dtype=pl.Float64),
        pl.Series("lt_score", lt_score if lt_score is not None else np.full(te.height, np.nan), dtype=pl.Float64),
        te[S.RETURNED_1D],
        te[S.ACTIVE_DAYS_7],
        te[S.LT_OBSERVED],  # lt metrics use the observed rows only
    )
    key = key or lightgbm_key(features_dir, match_dir if mcols else None, cfg)
    out = Path(out_dir)
    with atomic_outputs(out) as tmp:
        write_parquet(preds, tmp / PREDICTIONS)
        (tmp / METRICS_FILE).write_text(json.dumps(json_safe(metrics) | {"reasons": reasons}, indent=2) + "\n")
        imp = click.feature_importance("gain")
        plots.feature_importance(imp, tmp / IMPORTANCE_PNG, title=f"LightGBM gain ({'with' if mcols else 'without'} match features)")
        write_manifest(
            tmp,
            job=JOB,
            key=key,
            outputs=[PREDICTIONS],
            extra={"config": to_dict(cfg), "features": features, "importance_gain": imp, "metrics": json_safe(metrics),
                   "files": {name: file_fingerprint(tmp / name) for name in (METRICS_FILE, IMPORTANCE_PNG)}},
        )
    tracker.set_tags({"model": "lightgbm", "config_hash": config_hash(cfg), "match_features": str(bool(mcols)).lower()})
    tracker.log_params(flatten({"lightgbm": to_dict(cfg)}) | {"n_features": len(features), "features": ",".join(features)})
    tracker.log_metrics({k: v for k, v in metrics.items()
                         if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)})
    for name in (METRICS_FILE, PREDICTIONS, IMPORTANCE_PNG):
        tracker.log_artifact(out / name)
    from recsys.eval.metrics import constant_scores_warning, format_metric

    shown = " ".join(
        f"{m} {format_metric(metrics[m])}" + (f" ({reasons[m]})" if m in reasons else "")
        for m in ("auc", "gauc", "logloss", "lt_auc", "lt_spearman")
    )
    log(f"lightgbm: test {shown} ({len(features)} features, {click.best_iteration_} trees) -> {out} "
        f"in {time.perf_counter() - t0:.1f}s")
    if (note := constant_scores_warning(score, "lightgbm")) is not None:
        log(note)
    return metrics | {"reasons": reasons}


def compare_gauc(
    treatment: str | Path, control: str | Path, *, n_boot: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """Paired bootstrap over users of test GAUC(treatment) - GAUC(control),
    from two predictions.parquet files scoring the same test rows."""
    from recsys.eval.bootstrap import paired_bootstrap
    from recsys.eval.metrics import METRICS

    keys = [S.USER_ID, S.ITEM_ID, S.TIMESTAMP]
    t = pl.read_parquet(Path(treatment) / PREDICTIONS)
    c = pl.read_parquet(Path(control) / PREDICTIONS)
    if not t.select(keys).equals(c.select(keys)):
        raise DataError(
            "the two runs did not score the same test rows", file=str(Path(treatment) / PREDICTIONS), column=",".join(keys)
        )
    ci = paired_bootstrap(
        METRICS["gauc"], t[S.USER_ID].to_numpy(), t[S.LABEL].to_numpy(), t["score"].to_numpy(), c["score"].to_numpy(),
        n_boot=n_boot, rng=np.random.default_rng(seed),
    )
    return {
        "metric": "gauc", "treatment": ci.treatment, "control": ci.control, "delta": ci.delta,
        "ci_low": ci.ci_low, "ci_high": ci.ci_high, "n_boot": ci.n_boot, "n_users": ci.n_users,
        "significant": ci.significant,
    }


def match_lift(
    features_dir: str | Path,
    match_dir: str | Path,
    out_dir: str | Path,
    cfg: LightGBMConfig | None = None,
    tracker: Tracker | None = None,
    *,
    n_boot: int = 1000,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Both arms (out_dir/with_match, out_dir/no_match, same config otherwise)
    and out_dir/lift.json: their test metrics and the GAUC delta with its
    paired bootstrap 95% interval over users."""
    cfg = cfg or LightGBMConfig()
    out = Path(out_dir)
    with_cfg = dataclasses.replace(cfg, use_match_features=True)
    without_cfg = dataclasses.replace(cfg, use_match_features=False)
    arms = {
        "with_match": run_lightgbm(features_dir, match_dir, out / "with_match", with_cfg, tracker, log=log),
        "no_match": run_lightgbm(features_dir, None, out / "no_match", without_cfg, NullTracker(), log=log),
    }
    lift = compare_gauc(out / "with_match", out / "no_match", n_boot=n_boot, seed=cfg.seed)
    report = {"arms": {k: json_safe(v) for k, v in arms.items()}, "gauc_lift": json_safe(lift)}
    atomic_write_text(out / "lift.json", json.dumps(report, indent=2) + "\n")
    (tracker or NullTracker()).log_metrics(
        {"gauc_lift": lift["delta"], "gauc_lift_ci_low": lift["ci_low"], "gauc_lift_ci_high": lift["ci_high"]}
    )
    log(
        f"lightgbm: test GAUC lift from match features {lift['delta']:+.4f} "
        f"(95% CI {lift['ci_low']:+.4f} .. {lift['ci_high']:+.4f})"
    )
    return report



__all__ = ["PREDICTION_COLUMNS", "check_inputs", "compare_gauc", "load_table", "match_lift", "run_lightgbm"]
