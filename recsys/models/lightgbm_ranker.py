"""LightGBM baseline model: gradient-boosted trees on the tabular features.

Inputs per impression (interactions.parquet, plus match_features.parquet):
match features (mf_*), item popularity (`item_pop`: events on the item
strictly earlier), user activity (`hist_end`), history lengths (`hist_len`,
`pos_hist_len`), and two rates derived from the same leak-free counts
(`use_rates`): the item's share of positives among its strictly earlier
events and the user's (pos_hist_end / hist_end). Without them no input tells
a well-liked movie from a popular one, and the trees fall well short of
ID-based peers on ML-100K. Missing values (empty history, unseen item) stay
NaN: LightGBM routes them down a learned branch instead of reading a fake zero.

This module holds the estimator, its config and the rate features; the job
that reads a features folder and writes the report is `recsys.baseline`.

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> X = rng.standard_normal((400, 3)); y = (X[:, 0] + 0.3 * rng.standard_normal(400) > 0).astype(int)
>>> m = LightGBMRanker(LightGBMConfig(n_estimators=20, num_threads=1)).fit(X[:300], y[:300], eval_set=(X[300:], y[300:]))
>>> m.predict_proba(X[300:]).shape, m.best_iteration_ > 0
((100, 2), True)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import polars as pl

from features import schemas as S
from recsys.config.sections import ITEM_POS_RATE, USER_POS_RATE, LightGBMConfig






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
    n_features_in_, evals_result_, no_early_stop_: why the eval set could not
    early-stop, when it could not: every tree is then kept)."""

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
        self.no_early_stop_ = None if eval_set is None else _unmeasurable(eval_set[1], eval_groups, c.objective)
        if self.no_early_stop_:  # its metric is the same at every iteration: early stopping would keep 1 tree
            eval_set = None
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


def _unmeasurable(y: np.ndarray, groups: np.ndarray | None, objective: str) -> str | None:
    """Why a valid set cannot rank iterations (None when it can): one label
    class (AUC is undefined, LightGBM reads 1.0 at every iteration) or, for
    lambdarank, no user with two label values (NDCG is 1 throughout)."""
    y = np.asarray(y)
    if len(np.unique(y)) < 2:
        return f"every valid label is {y[0]:g}" if len(y) else "the valid set is empty"
    if objective == "lambdarank" and groups is not None:
        g = np.asarray(groups)
        frame = pl.DataFrame({"g": g, "y": y})
        if frame.group_by("g").agg(pl.col("y").n_unique()).get_column("y").max() < 2:
            return "no valid user has impressions of two label values"
    return None


def _matrix(X: np.ndarray | pl.DataFrame) -> np.ndarray:
    """float32 matrix; polars nulls become NaN (LightGBM's missing value)."""
    if isinstance(X, pl.DataFrame):
        return X.select(pl.all().cast(pl.Float32)).to_numpy()
    return np.asarray(X, dtype=np.float32)


# the job moved to `recsys.baseline`; these names stay importable from here
__all__ = ["LightGBMConfig", "LightGBMRanker", "add_rate_features", "ITEM_POS_RATE", "USER_POS_RATE"]
