"""Compare experiment arms from their saved predictions.

Each arm (and seed) saved a predictions table of the same test impressions.
For every metric and treatment arm: the value (mean over seeds), the delta vs
control and a paired bootstrap 95% interval over users and seeds
(`recsys.eval.bootstrap`), a raw significance mark (the interval excludes 0)
and the mark after Holm's correction across the experiment's treatment arms x
metrics (`sig_holm`, from bootstrap p-values). Each metric is also reported
per segment of the test rows, when the predictions carry the columns:
cold vs warm items (`cold_item`), users new in test vs returning
(`new_user`: no train event), and history-length buckets (`hist_len`); each
segment is its own Holm family. Pure functions: loading runs from MLflow is
`recsys.experiment_run`'s job.

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
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import polars as pl

from features import schemas as S
from features.core.errors import DataError
from recsys.eval.bootstrap import holm, paired_bootstrap
from recsys.eval.metrics import METRICS

KEY = [S.USER_ID, S.ITEM_ID, S.TIMESTAMP]
NEW_USER = "new_user"  # the user has no event in the train split
ALL = "all"
HIST_EDGES = (1, 10, 50, 200)  # history-length buckets: 0, 1-9, 10-49, 50-199, 200+


def segments(columns: Sequence[str]) -> dict[str, pl.Expr]:
    """Segment name -> row filter, for the segment columns present."""
    out: dict[str, pl.Expr] = {ALL: pl.lit(True)}
    if S.COLD_ITEM in columns:
        out |= {"cold_item": pl.col(S.COLD_ITEM), "warm_item": ~pl.col(S.COLD_ITEM)}
    if NEW_USER in columns:
        out |= {"new_user": pl.col(NEW_USER), "returning_user": ~pl.col(NEW_USER)}
    if S.HIST_LEN in columns:
        lo = (0, *HIST_EDGES)
        hi = (*HIST_EDGES, None)
        for a, b in zip(lo, hi):
            name = f"hist_len {a}" if b == a + 1 else (f"hist_len {a}-{b - 1}" if b is not None else f"hist_len {a}+")
            expr = pl.col(S.HIST_LEN) >= a
            out[name] = expr & (pl.col(S.HIST_LEN) < b) if b is not None else expr
    return out


@dataclass(frozen=True)
class ArmPredictions:
    arm: str
    seed: int
    frame: pl.DataFrame  # user_id, item_id, timestamp, label, score, lt_score, returned_1d, active_days_7, lt_observed

    def __post_init__(self) -> None:
        if not isinstance(self.frame, pl.DataFrame):  # a pandas frame, say
            object.__setattr__(self, "frame", pl.DataFrame(self.frame))


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
    segment: str = ALL  # the test rows compared ("all", "cold_item", "hist_len 10-49", ...)
    p_value: float = float("nan")  # two-sided bootstrap p-value (NaN for the control)
    sig_holm: bool = False  # significant after Holm's correction across the segment's arms x metrics

    @property
    def computable(self) -> bool:
        return not self.reason


def _check_arm(p: ArmPredictions, m: Any) -> None:
    """DataError naming the arm, seed, column and rows when the scores of
    metric `m` are NaN or infinite (or, for logloss, no probabilities), or
    when its labels are null or not 0/1 where it needs binary ones."""
    where = f"predictions of arm {p.arm!r} (seed {p.seed})"
    score = p.frame[m.score].cast(pl.Float64).to_numpy()
    keep = metric_rows(p.frame, m)
    checks = [(keep & ~np.isfinite(score), m.score, "NaN or infinite score(s); the model diverged or the file is corrupt")]
    if m.kind == "logloss":
        checks.append(((score < 0) | (score > 1), m.score, "score(s) outside [0, 1]: logloss needs probabilities"))
    if m.kind in ("auc", "gauc", "logloss") and m.label in p.frame.columns:
        label = p.frame[m.label].cast(pl.Float64).fill_null(np.nan).to_numpy()
        checks.append((keep & ~np.isin(label, (0.0, 1.0)), m.label, "label(s) null or not 0/1"))
    for bad, column, message in checks:
        rows = np.flatnonzero(bad)
        if rows.size:
            raise DataError(f"{where}: {rows.size} {message}", column=column, rows=rows[:5].tolist())


def metric_rows(frame: pl.DataFrame, m: Any) -> np.ndarray:
    """(n,) the rows of a predictions table metric `m` reads (lt_*: the
    observed ones; every row when the table lacks its rows column)."""
    if m.rows is None or m.rows not in frame.columns:
        return np.ones(frame.height, bool)
    return frame[m.rows].fill_null(False).to_numpy().astype(bool)


def headless(frame: pl.DataFrame, m: Any) -> bool:
    """Whether the score column of metric `m` (not the click score) is NaN on
    every row: a model without that head (LightGBM trains no LT model when
    valid has no observed LT rows). Its metric is n/a, not an error."""
    return (m.score != METRICS["auc"].score and m.score in frame.columns and frame.height > 0
            and bool(frame[m.score].cast(pl.Float64).is_nan().all()))


def _check_same_truth(arms: Sequence[ArmPredictions], base: ArmPredictions, label: str) -> None:
    """Every arm's predictions carry the control's labels for the impressions
    both scored: compare reads the truth from the control, so an arm with
    other labels (another features build) would be scored on the wrong truth."""
    ref = base.frame.select(KEY + [label])
    for p in arms:
        if p is base or label not in p.frame.columns:
            continue
        both = ref.join(p.frame.select(KEY + [pl.col(label).alias("_other")]), on=KEY, how="inner")
        bad = both.filter(pl.col(label).ne_missing(pl.col("_other"))).height
        if bad:
            raise DataError(f"predictions of arm {p.arm!r} (seed {p.seed}) and of the control {base.arm!r} (seed "
                            f"{base.seed}) disagree on {label} of {bad} impressions: arms compared on one test set "
                            "carry one truth (were they built from the same features?)", column=label)


def _aligned(treat: list[ArmPredictions], ctrl: list[ArmPredictions], metric: str,
             segment: pl.Expr | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """users, truth, treatment scores (S, n), control scores (S, n) on the
    impressions both arms scored (seeds paired in sorted order) that fall in
    `segment` (a filter on the control's columns); n may be 0 when no such
    impression has an observed long-term label."""
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
    lt = m.rows is not None and m.rows in base.columns
    rows = base if segment is None else base.filter(segment)
    rows = rows.select(KEY + [m.label] + ([m.rows] if lt else []))
    for s in seeds:
        rows = rows.join(by_c[s].select(KEY + [pl.col(m.score).alias(f"c{s}")]), on=KEY, how="inner")
        rows = rows.join(by_t[s].select(KEY + [pl.col(m.score).alias(f"t{s}")]), on=KEY, how="inner")
    if rows.height == 0 and segment is None:
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
    by_segment: bool = True,
) -> list[CompareRow]:
    """Rows for every segment ("all" first), metric and arm (control first)."""
    if isinstance(metrics, str) or any(m not in METRICS for m in metrics):
        raise ValueError(f"metrics: a sequence of metric names among {', '.join(METRICS)}, got {metrics!r}")
    arms: dict[str, list[ArmPredictions]] = {}
    for p in predictions:
        arms.setdefault(p.arm, []).append(p)
    if control not in arms:
        raise DataError(f"no predictions for the control arm {control!r} (arms found: {sorted(arms)})")
    # each prediction table checked once per metric (not per segment and arm): those paired with a control seed
    ctrl_seeds = {p.seed for p in arms[control]}
    base = min(arms[control], key=lambda p: p.seed)
    paired = [p for p in predictions if p.seed in ctrl_seeds]
    for m in (METRICS[metric] for metric in metrics):
        for p in paired:
            if m.score in p.frame.columns and not headless(p.frame, m):  # a missing column is named by `_aligned`
                _check_arm(p, m)
        if m.label in base.frame.columns:
            _check_same_truth(paired, base, m.label)
    order = [control] + [a for a in arms if a != control]
    segs = segments(arms[control][0].frame.columns) if by_segment else {ALL: pl.lit(True)}
    out: list[CompareRow] = []
    for name, expr in segs.items():
        family: list[CompareRow] = []
        seg_rows = arms[control][0].frame.height if name == ALL else arms[control][0].frame.filter(expr).height
        for metric in metrics:
            m = METRICS[metric]
            for arm in order:
                users, y, st, sc = _aligned(arms[arm], arms[control], metric, None if name == ALL else expr)
                # one generator per (segment, metric, arm) from the same seed: every arm
                # is resampled on the same users, and the order of arms is moot
                ci = paired_bootstrap(m, users, y, st, sc, n_boot=n_boot, rng=np.random.default_rng(seed))
                headless_arms = sorted({p.arm for p in arms[arm] + arms[control] if headless(p.frame, m)})
                if headless_arms:
                    ci = replace(ci, treatment=float("nan"), control=float("nan"), delta=float("nan"),
                                 ci_low=float("nan"), ci_high=float("nan"), p_value=float("nan"))
                    reason = (f"arm {headless_arms[0]!r} has no model for {m.score} (NaN on every row, e.g. LightGBM "
                              "without observed LT rows in valid)")
                else:
                    reason = why_not_computable(m, users, y, seg_rows) if math.isnan(ci.treatment) or math.isnan(ci.control) else ""
                family.append(CompareRow(
                    arm=arm, metric=metric, value=ci.treatment, delta=ci.delta, ci_low=ci.ci_low,
                    ci_high=ci.ci_high, control_value=ci.control, significant=ci.significant,
                    regression=ci.regression, higher_is_better=m.higher_is_better, n_users=ci.n_users,
                    seeds=st.shape[0], reason=reason, segment=name,
                    p_value=ci.p_value if arm != control else float("nan"),
                ))
        rejected = holm([r.p_value for r in family])
        out += [replace(r, sig_holm=rej) for r, rej in zip(family, rejected)]
    note = holm_resolution_note(out, n_boot)
    if note:
        print(f"warning: {note}", file=sys.stderr)
    return out


def holm_resolution_note(rows: Sequence[CompareRow], n_boot: int, alpha: float = 0.05) -> str | None:
    """Why Holm's marks would all read "n.s." whatever the data, or None.

    A bootstrap p-value is at least 2 / (B + 1), so a family of m tests can
    reject only if 2 / (B + 1) <= alpha / m: 1,000 replicates cover 25 tests
    (5 treatment arms x 5 metrics), not 30."""
    sizes: dict[str, int] = {}
    for r in rows:
        if not math.isnan(r.p_value):
            sizes[r.segment] = sizes.get(r.segment, 0) + 1
    m = max(sizes.values(), default=0)
    floor = 2 / (n_boot + 1)
    if not m or floor <= alpha / m:
        return None
    need = math.ceil(2 * m / alpha)
    return (f"Holm's correction cannot mark any of the {m} tests (treatment arms x metrics) of the whole test set "
            f"or of a segment with {n_boot} bootstrap replicates "
            f"(the smallest bootstrap p-value, {floor:.4f}, is above {alpha}/{m} = {alpha / m:.4f}); "
            f"rerun the compare with --n-boot {need} or more (the raw marks are unaffected)")


def why_not_computable(m: Any, users: np.ndarray, y: np.ndarray, segment_rows: int | None = None) -> str:
    """Why metric `m` is NaN on these rows, in words (`segment_rows`: test
    impressions in the segment, any label: 0 says the segment is empty)."""
    if len(y) == 0:
        if segment_rows == 0:
            return "no test impressions"
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


def _holm_mark(r: CompareRow, control: str) -> str:
    if r.reason or r.arm == control:
        return ""
    return "*" if r.sig_holm else "n.s."


def _render(header: list[str], body: list[list[str]], fmt: str, group_col: int = 0) -> str:
    if fmt == "markdown":
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in body]
        return "\n".join(lines)
    widths = [max(len(h), *(len(row[i]) for row in body)) if body else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)), "  ".join("-" * w for w in widths)]
    prev = None
    for row in body:
        if prev is not None and row[group_col] != prev:
            lines.append("")
        prev = row[group_col]
        lines.append("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())
    return "\n".join(lines)


def _ci(r: CompareRow) -> str:
    return "n/a" if math.isnan(r.ci_low) or math.isnan(r.ci_high) else f"[{r.ci_low:+.4f}, {r.ci_high:+.4f}]"


def format_rows(rows: Sequence[CompareRow], fmt: str, *, control: str) -> str:
    """table | markdown | csv | json. JSON rows carry the contract keys arm,
    metric, value, delta, ci_low, ci_high, segment, sig_holm, plus the rest.
    Tables show the whole test set first (with the raw and the Holm-corrected
    marks), then each treatment's delta per segment."""
    if fmt == "json":
        return json.dumps([_record(r) for r in rows], indent=2, allow_nan=False)
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(asdict(rows[0])) if rows else ["arm"])
        w.writeheader()
        for r in rows:
            w.writerow(_record(r))
        return buf.getvalue()
    if fmt not in ("table", "markdown"):
        raise ValueError(f"unknown format {fmt!r}")
    header = ["metric", "arm", "value", "delta vs control", "95% CI", "sig.", "Holm"]
    body = [
        [
            r.metric + ("" if r.higher_is_better else " (lower=better)"),
            r.arm,
            _num(r.value, ".4f"),
            "—" if r.arm == control else _num(r.delta, "+.4f"),
            "—" if r.arm == control else _ci(r),
            _mark(r, control),
            _holm_mark(r, control),
        ]
        for r in rows if r.segment == ALL
    ]
    text = _render(header, body, fmt)
    seg_rows = [r for r in rows if r.segment != ALL and r.arm != control]
    if seg_rows:
        seg_header = ["segment", "metric", "arm", "users", "control", "delta", "95% CI", "sig.", "Holm"]
        seg_body = [
            [r.segment, r.metric, r.arm, str(r.n_users), _num(r.control_value, ".4f"), _num(r.delta, "+.4f"), _ci(r),
             _mark(r, control), _holm_mark(r, control)]
            for r in seg_rows
        ]
        title = "By segment (each segment is its own Holm family):"
        text += "\n\n" + (f"**{title}**\n\n" if fmt == "markdown" else f"{title}\n") + _render(seg_header, seg_body, fmt)
    return text


def regressions(rows: Sequence[CompareRow], metric: str, control: str) -> list[CompareRow]:
    """Treatment rows of `metric` (whole test set) whose interval lies entirely on the worse side of zero."""
    return [r for r in rows if r.metric == metric and r.arm != control and r.regression and r.segment == ALL]
