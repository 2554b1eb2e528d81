"""Compare experiment arms from their saved predictions.

Each arm (and seed) saved a predictions table of the same test impressions.
For every metric and treatment arm: the value (mean over seeds), the delta vs
control and a paired bootstrap 95% interval over users, plus a significance
mark. Pure functions: loading runs from MLflow is `recsys.pipeline`'s job.

A metric that cannot be computed (no test row has an observed long-term
label, one class only, a constant target) is NaN with a `reason`: `null` in
JSON, empty in CSV, `n/a (reason)` in tables, never significant. A NaN score
in a predictions table is a data error, never a number.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import polars as pl

from features import schemas as S
from features.core.errors import DataError
from recsys.eval.bootstrap import paired_bootstrap
from recsys.eval.metrics import METRICS

KEY = [S.USER_ID, S.ITEM_ID, S.TIMESTAMP]


@dataclass(frozen=True)
class ArmPredictions:
    arm: str
    seed: int
    frame: pl.DataFrame  # user_id, item_id, timestamp, label, score, lt_score, returned_1d, active_days_7, lt_observed


@dataclass(frozen=True)
class CompareRow:
    arm: str
    metric: str
    value: float
    delta: float
    ci_low: float
    ci_high: float
    control_value: float
    significant: bool
    regression: bool  # interval entirely on the worse side of zero
    higher_is_better: bool
    n_users: int
    seeds: int
    reason: str = ""  # why value/delta are NaN ("" when they are numbers)

    @property
    def computable(self) -> bool:
        return not self.reason


def _check_scores(p: ArmPredictions, column: str) -> None:
    """DataError naming the arm, seed, column and rows when scores are NaN."""
    col = p.frame[column]
    if col.dtype.is_float():
        bad = np.flatnonzero(np.isnan(col.to_numpy().astype(np.float64)))
        if bad.size:
            raise DataError(
                f"predictions of arm {p.arm!r} (seed {p.seed}): {bad.size} NaN score(s); the model diverged or the file is corrupt",
                column=column, rows=bad.tolist(),
            )


def _aligned(treat: list[ArmPredictions], ctrl: list[ArmPredictions], metric: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """users, truth, treatment scores (S, n), control scores (S, n) on the
    impressions both arms scored (seeds paired in sorted order); n may be 0
    when no common impression has an observed long-term label."""
    m = METRICS[metric]
    seeds = sorted({p.seed for p in treat} & {p.seed for p in ctrl})
    if not seeds:
        raise DataError(f"arms {treat[0].arm!r} and {ctrl[0].arm!r} share no seed")
    by_t = {p.seed: p.frame for p in treat}
    by_c = {p.seed: p.frame for p in ctrl}
    base = by_c[seeds[0]]
    need = [m.label, m.score]
    for name, frame in ((ctrl[0].arm, base), (treat[0].arm, by_t[seeds[0]])):
        missing = [c for c in KEY + need if c not in frame.columns]
        if missing:
            raise DataError(f"predictions of arm {name!r} lack column(s) {missing}", column=missing[0])
    for p in treat + ctrl:
        if p.seed in seeds:
            _check_scores(p, m.score)
    lt = m.rows is not None and m.rows in base.columns
    rows = base.select(KEY + [m.label] + ([m.rows] if lt else []))
    for s in seeds:
        rows = rows.join(by_c[s].select(KEY + [pl.col(m.score).alias(f"c{s}")]), on=KEY, how="inner")
        rows = rows.join(by_t[s].select(KEY + [pl.col(m.score).alias(f"t{s}")]), on=KEY, how="inner")
    if rows.height == 0:
        raise DataError(f"arms {treat[0].arm!r} and {ctrl[0].arm!r} scored no common impressions")
    if lt:
        rows = rows.filter(pl.col(m.rows).fill_null(False)).drop(m.rows)
    rows = rows.drop_nulls()
    st = np.stack([rows[f"t{s}"].to_numpy() for s in seeds])
    sc = np.stack([rows[f"c{s}"].to_numpy() for s in seeds])
    return rows[S.USER_ID].to_numpy(), rows[m.label].to_numpy(), st, sc


def compare_arms(
    predictions: Sequence[ArmPredictions],
    *,
    control: str,
    metrics: Sequence[str],
    n_boot: int = 1000,
    seed: int = 0,
) -> list[CompareRow]:
    """Rows for every arm (control first) and metric."""
    arms: dict[str, list[ArmPredictions]] = {}
    for p in predictions:
        arms.setdefault(p.arm, []).append(p)
    if control not in arms:
        raise DataError(f"no predictions for the control arm {control!r} (arms found: {sorted(arms)})")
    order = [control] + [a for a in arms if a != control]
    out = []
    for metric in metrics:
        m = METRICS[metric]
        for arm in order:
            users, y, st, sc = _aligned(arms[arm], arms[control], metric)
            # one generator per (metric, arm) from the same seed: every arm
            # is resampled on the same users, and the order of arms is moot
            ci = paired_bootstrap(m, users, y, st, sc, n_boot=n_boot, rng=np.random.default_rng(seed))
            reason = why_not_computable(m, users, y) if math.isnan(ci.treatment) or math.isnan(ci.control) else ""
            out.append(
                CompareRow(
                    arm=arm,
                    metric=metric,
                    value=ci.treatment,
                    delta=ci.delta,
                    ci_low=ci.ci_low,
                    ci_high=ci.ci_high,
                    control_value=ci.control,
                    significant=ci.significant,
                    regression=ci.regression,
                    higher_is_better=m.higher_is_better,
                    n_users=ci.n_users,
                    seeds=st.shape[0],
                    reason=reason,
                )
            )
    return out


def why_not_computable(m: Any, users: np.ndarray, y: np.ndarray) -> str:
    """Why metric `m` is NaN on these rows, in words."""
    if len(y) == 0:
        if m.label != "label":
            return "no test impression has an observed long-term label"
        return "no test impressions"
    classes = np.unique(y)
    if m.kind == "auc" and len(classes) < 2:
        return f"every {m.label} is {classes[0]:g}: AUC needs both classes"
    if m.kind == "gauc":
        return "no user has both a positive and a negative impression"
    if m.kind == "spearman" and (len(y) < 2 or len(classes) < 2):
        return f"{m.label} is constant: no rank correlation"
    return "the scores give no defined value (constant or non-finite)"


def _num(x: float, fmt: str) -> str:
    return "n/a" if x is None or math.isnan(x) else format(x, fmt)


def _record(r: CompareRow) -> dict[str, Any]:
    """The row for JSON/CSV: NaN becomes None (`null`; empty in CSV)."""
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(r).items()}


def _mark(r: CompareRow, control: str) -> str:
    if r.reason:
        return f"n/a ({r.reason})"
    if r.arm == control:
        return "(control)"
    if not r.significant:
        return "n.s."
    better = (r.delta > 0) == r.higher_is_better
    return "better *" if better else "WORSE *"


def format_rows(rows: Sequence[CompareRow], fmt: str, *, control: str) -> str:
    """table | markdown | csv | json (the json rows carry the contract keys
    arm, metric, value, delta, ci_low, ci_high, plus the rest)."""
    if fmt == "json":
        return json.dumps([_record(r) for r in rows], indent=2, allow_nan=False)
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(asdict(rows[0])) if rows else ["arm"])
        w.writeheader()
        for r in rows:
            w.writerow(_record(r))
        return buf.getvalue()
    header = ["metric", "arm", "value", "delta vs control", "95% CI", "sig."]
    body = [
        [
            r.metric + ("" if r.higher_is_better else " (lower=better)"),
            r.arm,
            _num(r.value, ".4f"),
            "—" if r.arm == control else _num(r.delta, "+.4f"),
            "—" if r.arm == control else (
                "n/a" if math.isnan(r.ci_low) or math.isnan(r.ci_high) else f"[{r.ci_low:+.4f}, {r.ci_high:+.4f}]"
            ),
            _mark(r, control),
        ]
        for r in rows
    ]
    if fmt == "markdown":
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in body]
        return "\n".join(lines)
    if fmt == "table":
        widths = [max(len(h), *(len(row[i]) for row in body)) for i, h in enumerate(header)]
        lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
        lines.append("  ".join("-" * w for w in widths))
        prev = None
        for row in body:
            if prev is not None and row[0] != prev:
                lines.append("")
            prev = row[0]
            lines.append("  ".join(v.ljust(w) for v, w in zip(row, widths)))
        return "\n".join(lines)
    raise ValueError(f"unknown format {fmt!r}")


def regressions(rows: Sequence[CompareRow], metric: str, control: str) -> list[CompareRow]:
    """Treatment rows of `metric` whose interval lies entirely on the worse side of zero."""
    return [r for r in rows if r.metric == metric and r.arm != control and r.regression]
