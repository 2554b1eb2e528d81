"""LightGBM baseline: gradient-boosted trees on the tabular features.

Inputs per impression (interactions.parquet, plus match_features.parquet):
match features (mf_*), item popularity (`item_pop`: events on the item
strictly earlier), user activity (`hist_end`), history lengths (`hist_len`,
`pos_hist_len`), and two rates derived from the same leak-free counts
(`use_rates`): the item's share of positives among its strictly earlier
events and the user's (pos_hist_end / hist_end). Without them no input tells
a well-liked movie from a popular one, and the trees fall well short of
ID-based peers on ML-100K. Missing values (empty history, unseen item) stay
NaN: LightGBM routes them down a learned branch instead of reading a fake zero.

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

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> X = rng.standard_normal((400, 3)); y = (X[:, 0] + 0.3 * rng.standard_normal(400) > 0).astype(int)
>>> m = LightGBMRanker(LightGBMConfig(n_estimators=20, num_threads=1)).fit(X[:300], y[:300], eval_set=(X[300:], y[300:]))
>>> m.predict_proba(X[300:]).shape, m.best_iteration_ > 0
((100, 2), True)
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import polars as pl

from features import schemas as S
from features.core.config import config_hash, flatten, to_dict
from features.core.errors import ConfigError, DataError, UsageError
from features.core.manifest import atomic_outputs, read_manifest, write_manifest, write_parquet
from features.core.tracker import NullTracker, Tracker
from recsys import plots

MATCH_FILE = "match_features.parquet"
MATCH_PREFIX = "mf_"
PREDICTIONS = "predictions.parquet"
METRICS_FILE = "metrics.json"
IMPORTANCE_PNG = "feature_importance.png"
PREDICTION_COLUMNS = [
    S.USER_ID, S.ITEM_ID, S.TIMESTAMP, S.LABEL, "score", "lt_score", S.RETURNED_1D, S.ACTIVE_DAYS_7,
]


@dataclass(frozen=True)
class LightGBMConfig:
    """LightGBM baseline settings (pipeline config section `lightgbm`)."""

    # "binary": click probability; "lambdarank": ranks each user's impressions
    # (score = sigmoid(raw), not calibrated: its logloss is not meaningful)
    objective: Literal["binary", "lambdarank"] = "binary"  # binary log-loss, or lambdarank grouped by user
    num_leaves: int = 15  # leaves per tree (chosen on valid AUC)
    learning_rate: float = 0.05  # shrinkage per tree
    n_estimators: int = 1000  # upper bound; early stopping on valid picks the number
    early_stopping_rounds: int = 50  # stop when valid loss has not improved for this many trees
    min_child_samples: int = 100  # rows per leaf: ML-100K is small, keep leaves stable
    feature_fraction: float = 0.9  # share of features sampled per tree
    bagging_fraction: float = 0.8  # share of rows sampled per bagging round
    bagging_freq: int = 1  # re-sample rows every this many trees (0: no bagging)
    lambda_l2: float = 1.0  # L2 penalty on leaf values
    use_match_features: bool = True  # mf_* columns of the match-features folder
    use_popularity: bool = True  # item_pop
    use_activity: bool = True  # hist_end
    use_history_length: bool = True  # hist_len, pos_hist_len
    use_rates: bool = True  # item_pos_rate, user_pos_rate (add_rate_features)
    lt_model: bool = True  # train the LT-proxy model (returned_1d) for lt_score
    # one thread: the same trees on every machine, and on ML-100K-sized data
    # faster than an OpenMP pool (which stalls badly on a shared machine)
    num_threads: int = 1  # 0: LightGBM's default (all cores)
    seed: int = 0  # LightGBM seed (the experiment runner sets it per seed)

    def __post_init__(self) -> None:
        if self.num_leaves < 2:
            raise ValueError("num_leaves must be >= 2")
        if not 0 < self.learning_rate <= 1:
            raise ValueError("learning_rate must be in (0, 1]")
        if self.n_estimators < 1 or self.early_stopping_rounds < 1:
            raise ValueError("n_estimators and early_stopping_rounds must be >= 1")
        if self.min_child_samples < 1:
            raise ValueError("min_child_samples must be >= 1")
        if not (0 < self.feature_fraction <= 1 and 0 < self.bagging_fraction <= 1):
            raise ValueError("feature_fraction and bagging_fraction must be in (0, 1]")
        if self.bagging_freq < 0 or self.lambda_l2 < 0 or self.num_threads < 0:
            raise ValueError("bagging_freq, lambda_l2 and num_threads must be >= 0")

    def base_features(self) -> list[str]:
        """The interactions columns this config uses."""
        cols = []
        if self.use_popularity:
            cols.append(S.ITEM_POP)
        if self.use_activity:
            cols.append(S.HIST_END)
        if self.use_history_length:
            cols += [S.HIST_LEN, S.POS_HIST_LEN]
        if self.use_rates:
            cols += [ITEM_POS_RATE, USER_POS_RATE]
        return cols


ITEM_POS_RATE = "item_pos_rate"  # positives / events on the item strictly earlier (null: none yet)
USER_POS_RATE = "user_pos_rate"  # pos_hist_end / hist_end (null: no history)


def add_rate_features(lf: pl.LazyFrame) -> pl.LazyFrame:
    """Leak-free like-rates of the item and of the user, from events strictly
    earlier in time (events of the same second never count, as in item_pop)."""
    excl = pl.col(S.LABEL).cast(pl.Int64).cum_sum().over(S.ITEM_ID, order_by=[S.TIMESTAMP, "__row"]) - pl.col(S.LABEL)
    # the first event of a tie group sees only earlier seconds (two steps:
    # polars does not evaluate a window nested inside another window)
    pos_before = pl.col("__excl").min().over(S.ITEM_ID, S.TIMESTAMP)
    return (
        lf.with_row_index("__row")
        .with_columns(excl.alias("__excl"))
        .with_columns(
            pl.when(pl.col(S.ITEM_POP) > 0).then(pos_before / pl.col(S.ITEM_POP)).alias(ITEM_POS_RATE),
            pl.when(pl.col(S.HIST_END) > 0).then(pl.col(S.POS_HIST_END) / pl.col(S.HIST_END)).alias(USER_POS_RATE),
        )
        .drop("__row", "__excl")
    )


def _group_sizes(groups: np.ndarray) -> np.ndarray:
    """Sizes of the runs of equal consecutive ids (rows arrive sorted by user)."""
    g = np.asarray(groups)
    starts = np.flatnonzero(np.r_[True, g[1:] != g[:-1]])
    return np.diff(np.r_[starts, len(g)])


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


class LightGBMRanker:
    """scikit-learn style wrapper: `__init__` stores the config, `fit` returns
    self, learned state ends in `_` (booster_, best_iteration_, feature_names_,
    n_features_in_, evals_result_)."""

    def __init__(self, config: LightGBMConfig | None = None) -> None:
        self.config = config

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        return {"config": self.config}

    def set_params(self, **params: Any) -> LightGBMRanker:
        for k, v in params.items():
            setattr(self, k, v)
        return self

    def _params(self) -> dict[str, Any]:
        c = self.config or LightGBMConfig()
        metric = ["auc", "binary_logloss"] if c.objective == "binary" else ["ndcg"]
        return {
            "objective": c.objective,
            "metric": metric,
            "eval_at": [10],
            "num_leaves": c.num_leaves,
            "learning_rate": c.learning_rate,
            "min_child_samples": c.min_child_samples,
            "feature_fraction": c.feature_fraction,
            "bagging_fraction": c.bagging_fraction,
            "bagging_freq": c.bagging_freq,
            "lambda_l2": c.lambda_l2,
            "num_threads": c.num_threads,
            "seed": c.seed,
            "deterministic": True,  # same seed, data and threads -> same trees
            "force_col_wise": True,
            "verbosity": -1,
        }

    def fit(
        self,
        X: np.ndarray | pl.DataFrame,
        y: np.ndarray,
        *,
        eval_set: tuple[Any, np.ndarray] | None = None,
        groups: np.ndarray | None = None,  # lambdarank: per-row user id (rows grouped by user)
        eval_groups: np.ndarray | None = None,
        feature_names: Sequence[str] | None = None,
    ) -> LightGBMRanker:
        import lightgbm as lgb

        c = self.config or LightGBMConfig()
        if isinstance(X, pl.DataFrame):
            names = list(X.columns)
        else:
            names = list(feature_names or [f"f{i}" for i in range(np.shape(X)[1])])
        if c.objective == "lambdarank" and groups is None:
            raise ValueError("lambdarank needs `groups` (the user of each row)")
        train = lgb.Dataset(
            _matrix(X), label=np.asarray(y), feature_name=names, free_raw_data=False,
            group=_group_sizes(groups) if c.objective == "lambdarank" else None,
        )
        valid_sets, callbacks, evals = [], [], {}
        if eval_set is not None:
            Xv, yv = eval_set
            valid_sets = [
                lgb.Dataset(
                    _matrix(Xv), label=np.asarray(yv), reference=train,
                    group=_group_sizes(eval_groups) if c.objective == "lambdarank" else None,
                )
            ]
            callbacks = [
                lgb.early_stopping(c.early_stopping_rounds, first_metric_only=True, verbose=False),
                lgb.record_evaluation(evals),
            ]
        booster = lgb.train(
            self._params(), train, num_boost_round=c.n_estimators,
            valid_sets=valid_sets, valid_names=["valid"] if valid_sets else None, callbacks=callbacks,
        )
        self.booster_ = booster
        self.best_iteration_ = int(booster.best_iteration or booster.current_iteration())
        self.feature_names_ = names
        self.n_features_in_ = len(names)
        self.evals_result_ = evals
        return self

    def decision_function(self, X: np.ndarray | pl.DataFrame) -> np.ndarray:
        """Raw scores (log-odds for binary)."""
        return self.booster_.predict(_matrix(X), num_iteration=self.best_iteration_, raw_score=True)

    def predict_proba(self, X: np.ndarray | pl.DataFrame) -> np.ndarray:
        """(n, 2) class probabilities; column 1 is the click probability."""
        p = _sigmoid(self.decision_function(X))
        return np.stack([1 - p, p], axis=1)

    def predict(self, X: np.ndarray | pl.DataFrame) -> np.ndarray:
        return (self.predict_proba(X)[:, 1] >= 0.5).astype(np.int64)

    def feature_importance(self, kind: Literal["gain", "split"] = "gain") -> dict[str, float]:
        values = self.booster_.feature_importance(importance_type=kind, iteration=self.best_iteration_)
        return dict(zip(self.feature_names_, (float(v) for v in values)))


def _matrix(X: np.ndarray | pl.DataFrame) -> np.ndarray:
    """float32 matrix; polars nulls become NaN (LightGBM's missing value)."""
    if isinstance(X, pl.DataFrame):
        return X.select(pl.all().cast(pl.Float32)).to_numpy()
    return np.asarray(X, dtype=np.float32)


# --- the report ------------------------------------------------------------------


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


def _parquet_schema(path: Path) -> pl.Schema:
    try:
        return pl.Schema(pl.read_parquet_schema(path))
    except Exception as e:  # noqa: BLE001 - polars raises several types for a broken file
        raise DataError(f"not a readable parquet file: {e}", file=str(path)) from e


def load_table(features_dir: str | Path, match_dir: str | Path | None) -> tuple[pl.DataFrame, list[str]]:
    """interactions.parquet with the rate features and the mf_* columns of
    `match_dir` attached (checked row by row: same user_id, item_id,
    timestamp, same order)."""
    from features.core.errors import SchemaError

    inter_file, mfile = check_inputs(features_dir, match_dir)
    schema = _parquet_schema(inter_file)
    for col in _NEEDED:
        if col not in schema:
            raise SchemaError(f"missing column (found: {', '.join(schema.names())})", file=str(inter_file), column=col)
    try:
        inter = pl.scan_parquet(inter_file).pipe(add_rate_features).collect()
    except pl.exceptions.PolarsError as e:
        raise DataError(f"cannot be read as a features table: {str(e).strip().splitlines()[0]}",
                        file=str(inter_file)) from e
    if mfile is None:
        return inter, []
    _parquet_schema(mfile)
    try:
        mf = pl.read_parquet(mfile)
    except Exception as e:  # noqa: BLE001
        raise DataError(f"not a readable parquet file: {e}", file=str(mfile)) from e
    missing = [k for k in (S.USER_ID, S.ITEM_ID, S.TIMESTAMP) if k not in mf.columns]
    if missing:
        raise SchemaError(f"missing column (found: {', '.join(mf.columns)})", file=str(mfile), column=missing[0])
    keys = [S.USER_ID, S.ITEM_ID, S.TIMESTAMP]
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
    """Test (or `prefix`ed valid) metrics; each NaN one gets its reason in
    `reasons` (e.g. "no observed LT rows"). `lt_missing`: why there is no LT model."""
    from recsys.eval.metrics import METRICS, compute, nan_reason

    users = frame[S.USER_ID].to_numpy()
    y = frame[S.LABEL].to_numpy()
    out = {}
    for m in ("auc", "gauc", "logloss"):
        out[f"{prefix}{m}"] = compute(METRICS[m], users, y, score)
        if not math.isfinite(out[f"{prefix}{m}"]):
            reasons[f"{prefix}{m}"] = nan_reason(METRICS[m].kind, y, score, S.LABEL)
    obs = frame[S.LT_OBSERVED].to_numpy()
    for m in ("lt_auc", "lt_spearman"):
        metric, key = METRICS[m], f"{prefix}{m}"
        if lt_score is None or not obs.any():
            out[key] = float("nan")
            reasons[key] = lt_missing if lt_score is None else \
                f"no observed LT rows ({S.LT_OBSERVED} is false on all {frame.height} rows)"
            continue
        truth = frame[metric.label].to_numpy()[obs]
        out[key] = compute(metric, users[obs], truth, lt_score[obs])
        if not math.isfinite(out[key]):
            reasons[key] = nan_reason(metric.kind, truth, lt_score[obs], metric.label)
    return out


def run_lightgbm(
    features_dir: str | Path,
    match_dir: str | Path | None,
    out_dir: str | Path,
    cfg: LightGBMConfig | None = None,
    tracker: Tracker | None = None,
    *,
    log: Callable[[str], None] = print,
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
    inter_file = str(Path(features_dir) / S.FILES["interactions"])
    if min(tr.height, va.height, te.height) == 0:
        raise DataError("lightgbm needs rows in train, valid and test", file=inter_file, column=S.SPLIT)
    if tr[S.LABEL].n_unique() < 2:
        raise DataError(
            f"every train row has {S.LABEL} = {tr[S.LABEL][0]} ({tr.height} rows): nothing to learn "
            "(check the label threshold of `recsys features build`)",
            file=inter_file, column=S.LABEL,
        )

    def fit(train: pl.DataFrame, valid: pl.DataFrame, label: str) -> LightGBMRanker:
        return LightGBMRanker(cfg).fit(
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
            lt = fit(tr_lt, va_lt, S.RETURNED_1D)
    score, lt_score = prob(click, te), (prob(lt, te) if lt is not None else None)
    reasons: dict[str, str] = {}
    metrics = _metrics(te, score, lt_score, reasons, lt_missing=lt_missing)
    metrics |= _metrics(va, prob(click, va), prob(lt, va) if lt is not None else None, reasons, prefix="valid_",
                        lt_missing=lt_missing)
    metrics |= {"best_iteration": click.best_iteration_, "lt_best_iteration": lt.best_iteration_ if lt is not None else 0}

    preds = te.select(S.USER_ID, S.ITEM_ID, S.TIMESTAMP, S.LABEL).with_columns(
        pl.Series("score", score, dtype=pl.Float64),
        pl.Series("lt_score", lt_score if lt_score is not None else np.full(te.height, np.nan), dtype=pl.Float64),
        te[S.RETURNED_1D],
        te[S.ACTIVE_DAYS_7],
        te[S.LT_OBSERVED],  # lt metrics use the observed rows only
    )
    fm = read_manifest(features_dir) or {}
    upstream = {"interactions": fm.get("outputs", {}).get(S.FILES["interactions"], {}).get("fingerprint", "")}
    if mcols:
        mm = read_manifest(match_dir) or {}
        upstream["match_features"] = mm.get("outputs", {}).get(MATCH_FILE, {}).get("fingerprint", "")
    out = Path(out_dir)
    with atomic_outputs(out) as tmp:
        write_parquet(preds, tmp / PREDICTIONS)
        (tmp / METRICS_FILE).write_text(json.dumps(_jsonable(metrics) | {"reasons": reasons}, indent=2) + "\n")
        imp = click.feature_importance("gain")
        plots.feature_importance(imp, tmp / IMPORTANCE_PNG, title=f"LightGBM gain ({'with' if mcols else 'without'} match features)")
        write_manifest(
            tmp,
            job="recsys.baseline.lightgbm",
            key={"config_hash": config_hash(cfg), "upstream": upstream},
            outputs=[PREDICTIONS],
            extra={"config": to_dict(cfg), "features": features, "importance_gain": imp, "metrics": _jsonable(metrics)},
        )
    tracker.set_tags({"model": "lightgbm", "config_hash": config_hash(cfg), "match_features": str(bool(mcols)).lower()})
    tracker.log_params(flatten({"lightgbm": to_dict(cfg)}) | {"n_features": len(features), "features": ",".join(features)})
    tracker.log_metrics({k: v for k, v in metrics.items()
                         if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)})
    for name in (METRICS_FILE, PREDICTIONS, IMPORTANCE_PNG):
        tracker.log_artifact(out / name)
    from recsys.eval.metrics import format_metric

    shown = " ".join(
        f"{m} {format_metric(metrics[m])}" + (f" ({reasons[m]})" if m in reasons else "")
        for m in ("auc", "gauc", "logloss", "lt_auc")
    )
    log(f"lightgbm: test {shown} ({len(features)} features, {click.best_iteration_} trees) -> {out} "
        f"in {time.perf_counter() - t0:.1f}s")
    return metrics | {"reasons": reasons}


def _jsonable(d: Mapping[str, Any]) -> dict[str, Any]:
    """NaN -> null (JSON has no NaN)."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


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
    import dataclasses

    cfg = cfg or LightGBMConfig()
    out = Path(out_dir)
    with_cfg = dataclasses.replace(cfg, use_match_features=True)
    without_cfg = dataclasses.replace(cfg, use_match_features=False)
    arms = {
        "with_match": run_lightgbm(features_dir, match_dir, out / "with_match", with_cfg, tracker, log=log),
        "no_match": run_lightgbm(features_dir, None, out / "no_match", without_cfg, NullTracker(), log=log),
    }
    lift = compare_gauc(out / "with_match", out / "no_match", n_boot=n_boot, seed=cfg.seed)
    report = {"arms": {k: _jsonable(v) for k, v in arms.items()}, "gauc_lift": _jsonable(lift)}
    tmp = out / "lift.json.tmp"
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(out / "lift.json")
    (tracker or NullTracker()).log_metrics(
        {"gauc_lift": lift["delta"], "gauc_lift_ci_low": lift["ci_low"], "gauc_lift_ci_high": lift["ci_high"]}
    )
    log(
        f"lightgbm: test GAUC lift from match features {lift['delta']:+.4f} "
        f"(95% CI {lift['ci_low']:+.4f} .. {lift['ci_high']:+.4f})"
    )
    return report


__all__ = [
    "LightGBMConfig",
    "LightGBMRanker",
    "add_rate_features",
    "run_lightgbm",
    "match_lift",
    "compare_gauc",
    "load_table",
]
