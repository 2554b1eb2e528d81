"""Stacking-leak check for features computed by a model trained on the labels.

The student behind `item_embeddings` trains on the train-split positives of
the items it sees; the distill protocol hides a seeded random set of items
(test-cold and pseudo-cold) from all training. If the `mf_*` feature of a
train row is in-sample (the student saw that row's positive), it separates
the labels of train rows better than those of test rows, but only for items
the student trained on: the held-out items are the control. So, per column:

    gap_seen = AUC(train rows, seen items) - AUC(test rows, seen items)
    gap_held = AUC(train rows, held-out items) - AUC(test rows, held-out items)
    diff     = gap_seen - gap_held

`diff` > 0 beyond noise is the leak; the train/test gap that has nothing to
do with the student (time drift, users' activity) is in both gaps and
cancels. Whatever else flatters train rows of seen items is in `diff` too:
on ML-100K, features whose every row comes from a student that never saw
its user give diff ~ +0.025 (+-0.03), as much as in-sample ones do.

Rows of one user are correlated, so the 95% interval resamples USERS with
replacement; the four AUCs of a replicate are computed on the same resampled
users (`recsys.eval.bootstrap.user_multiplicities` + `replicate_values`).
It does not cover the draw of the held-out items (a seed of the model's
stage), which on ML-100K moves `gap_held` about as much as users do.

AUC is of `label` given the raw feature value. Per column, rows where the
feature is null or not finite are dropped, as are valid rows and rows of
items without any train row (no train rows to compare).

`leak_reduction(a, b)` compares two feature tables of the same rows (e.g.
in-sample vs out-of-fold): delta = diff_a - diff_b, both diffs of every
replicate on the same resampled users and, per column, on the rows where
both tables have a finite value. Rows with the same value in both tables
(test rows, when only train rows are refitted out of fold) cancel, so delta
is far less noisy than either diff (ML-100K: +-0.005 vs +-0.03). Its
interval covers users only, not the training of either table, and it
credits b with anything that lowers its diff: a weaker model as much as a
removed leak.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl

from features import schemas as S
from recsys.eval.bootstrap import replicate_values, user_multiplicities
from recsys.eval.metrics import METRICS, auc


@dataclass(frozen=True)
class LeakGap:
    """The train-minus-test AUC gaps of one feature, seen vs held-out items."""

    column: str
    auc_train_seen: float
    auc_test_seen: float
    auc_train_held: float
    auc_test_held: float
    ci_low: float  # 95% user-bootstrap percentile interval of `diff`
    ci_high: float
    n_boot: int
    n_users: int
    rows: dict[str, int]  # rows per group ("train_seen", "test_seen", "train_held", "test_held")

    @property
    def gap_seen(self) -> float:
        return self.auc_train_seen - self.auc_test_seen

    @property
    def gap_held(self) -> float:
        return self.auc_train_held - self.auc_test_held

    @property
    def diff(self) -> float:
        """gap_seen - gap_held: > 0 when train rows of seen items are flattered."""
        return self.gap_seen - self.gap_held

    @property
    def leaks(self) -> bool:
        """The interval of `diff` lies wholly above 0."""
        return bool(self.ci_low > 0)

    @property
    def agrees(self) -> bool:
        """The interval of `diff` contains 0: no leak detectable on these users."""
        return bool(self.ci_low <= 0 <= self.ci_high)

    def __str__(self) -> str:
        return (f"{self.column}: gap seen {self.gap_seen:+.4f}, held {self.gap_held:+.4f}, diff {self.diff:+.4f} "
                f"[{self.ci_low:+.4f}, {self.ci_high:+.4f}] ({self.n_users} users, rows {self.rows})")


@dataclass(frozen=True)
class LeakDelta:
    """How much leakier table a is than table b on the same rows: a.diff - b.diff."""

    column: str
    a: LeakGap  # of table a on the rows where both tables have a finite value
    b: LeakGap
    ci_low: float  # 95% paired user-bootstrap percentile interval of `delta`
    ci_high: float

    @property
    def delta(self) -> float:
        return self.a.diff - self.b.diff

    @property
    def removes_leak(self) -> bool:
        """The interval of `delta` lies wholly above 0: b is measurably less leaky than a."""
        return bool(self.ci_low > 0)

    def __str__(self) -> str:
        return (f"{self.column}: diff a {self.a.diff:+.4f}, b {self.b.diff:+.4f}, delta {self.delta:+.4f} "
                f"[{self.ci_low:+.4f}, {self.ci_high:+.4f}] ({self.a.n_users} users)")


GROUPS = (("train_seen", "train", False), ("test_seen", "test", False),
          ("train_held", "train", True), ("test_held", "test", True))
KEYS = (S.USER_ID, S.ITEM_ID, S.SPLIT, S.LABEL)


@dataclass(frozen=True)
class _Rows:
    """The rows the check scores and the user replicates, shared by every column (and table)."""

    keep: pl.Series  # (N,) bool over the frame: train and test rows of items with a train row
    u_idx: np.ndarray  # (n,) user index of each kept row
    is_train: np.ndarray  # (n,) bool
    is_held: np.ndarray  # (n,) bool: the model never trained on the row's item
    y: np.ndarray  # (n,) float labels
    counts: np.ndarray  # (B, U) user multiplicities of each replicate

    def values(self, frame: pl.DataFrame, col: str) -> np.ndarray:
        return frame.filter(self.keep)[col].cast(pl.Float64).fill_null(np.nan).to_numpy()  # (n,), NaN where null

    def gap(self, col: str, x: np.ndarray, ok: np.ndarray, alpha: float) -> tuple[LeakGap, np.ndarray]:
        """The LeakGap of score x on the rows `ok`, and its (B,) replicate diffs."""
        auc_of, reps, rows = {}, {}, {}
        for name, split, held in GROUPS:
            m = ok & (self.is_train == (split == "train")) & (self.is_held == held)
            rows[name], auc_of[name] = int(m.sum()), auc(self.y[m], x[m])
            reps[name] = replicate_values(METRICS["auc"], self.u_idx[m], self.y[m], x[m], self.counts)  # (B,)
        diffs = (reps["train_seen"] - reps["test_seen"]) - (reps["train_held"] - reps["test_held"])
        return LeakGap(col, *(auc_of[g[0]] for g in GROUPS), *_interval(diffs, alpha), len(self.counts),
                       len(np.unique(self.u_idx[ok])), rows), diffs


def _check(frame: pl.DataFrame, columns: Sequence[str]) -> None:
    if missing := [c for c in (*KEYS, *columns) if c not in frame.columns]:
        raise ValueError(f"frame lacks columns {missing}")


def _rows(frame: pl.DataFrame, hidden_items: Collection[int] | np.ndarray, n_boot: int, seed: int) -> _Rows:
    if n_boot < 2:
        raise ValueError(f"n_boot must be >= 2, got {n_boot}")
    trained = frame.filter(pl.col(S.SPLIT) == "train")[S.ITEM_ID].unique()
    keep = frame.select(pl.col(S.SPLIT).is_in(["train", "test"]) & pl.col(S.ITEM_ID).is_in(trained.implode())).to_series()
    base = frame.filter(keep)
    users, u_idx = np.unique(base[S.USER_ID].to_numpy(), return_inverse=True)
    held = np.isin(base[S.ITEM_ID].to_numpy(), np.asarray(list(hidden_items)))
    return _Rows(keep, u_idx, (base[S.SPLIT] == "train").to_numpy(), held, base[S.LABEL].cast(pl.Float64).to_numpy(),
                 user_multiplicities(len(users), n_boot, np.random.default_rng(seed)))


def _interval(reps: np.ndarray, alpha: float) -> tuple[float, float]:
    reps = reps[~np.isnan(reps)]
    return tuple(map(float, np.quantile(reps, [alpha / 2, 1 - alpha / 2]))) if len(reps) else (np.nan, np.nan)


def leak_gaps(frame: pl.DataFrame, columns: Sequence[str], hidden_items: Collection[int] | np.ndarray, *,
              n_boot: int = 500, seed: int = 0, alpha: float = 0.05) -> dict[str, LeakGap]:
    """`LeakGap` per column of `frame` (one row per impression: user_id,
    item_id, split, label and the `columns`); `hidden_items`: the item ids the
    model never trained on (for the distill student: its heldout | pseudo_cold
    items). Every column is bootstrapped on the same user replicates (`seed`).

    >>> rng = np.random.default_rng(0)
    >>> y = rng.integers(0, 2, 4000)
    >>> f = pl.DataFrame({"user_id": rng.integers(0, 200, 4000), "item_id": rng.integers(0, 40, 4000),
    ...                   "split": np.where(rng.random(4000) < 0.5, "train", "test"), "label": y,
    ...                   "x": y + rng.normal(0, 2, 4000)})
    >>> g = leak_gaps(f, ["x"], hidden_items=range(20), n_boot=200)["x"]
    >>> g.agrees, g.leaks
    (True, False)
    """
    _check(frame, columns)
    r = _rows(frame, hidden_items, n_boot, seed)
    out: dict[str, LeakGap] = {}
    for col in columns:
        x = r.values(frame, col)
        out[col] = r.gap(col, x, np.isfinite(x), alpha)[0]
    return out


def leak_reduction(frame_a: pl.DataFrame, frame_b: pl.DataFrame, columns: Sequence[str],
                   hidden_items: Collection[int] | np.ndarray, *, n_boot: int = 500, seed: int = 0,
                   alpha: float = 0.05) -> dict[str, LeakDelta]:
    """`LeakDelta` per column: the `leak_gaps` diff of table a minus that of
    table b, paired. The frames must hold the same rows in the same order
    (same user_id, item_id, split and label); only the `columns` may differ.
    A column is scored on the rows where both tables have a finite value."""
    for f in (frame_a, frame_b):
        _check(f, columns)
    if not frame_a.select(KEYS).equals(frame_b.select(KEYS)):
        raise ValueError("leak_reduction: the two frames must hold the same rows in the same order")
    r = _rows(frame_a, hidden_items, n_boot, seed)  # rows and replicates of both tables (their keys are equal)
    out: dict[str, LeakDelta] = {}
    for col in columns:
        xa, xb = r.values(frame_a, col), r.values(frame_b, col)
        ok = np.isfinite(xa) & np.isfinite(xb)
        (ga, reps_a), (gb, reps_b) = r.gap(col, xa, ok, alpha), r.gap(col, xb, ok, alpha)
        out[col] = LeakDelta(col, ga, gb, *_interval(reps_a - reps_b, alpha))
    return out


__all__ = ["LeakDelta", "LeakGap", "leak_gaps", "leak_reduction"]
