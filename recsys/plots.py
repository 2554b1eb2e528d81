"""PNG figures for every stage: training curves, ROC curves, A/B deltas with
confidence intervals, singular-value spectra, feature importance.

Each helper takes plain data (mappings, sequences, numpy arrays) and an output
path, writes the PNG atomically (a temp name in the same folder, then a
rename: no half-written figure ever has the final name) and returns the path.
Figures are built on `matplotlib.figure.Figure` with the Agg canvas, never
through pyplot, so there is no global figure state and no display needed.
Log them with `tracker.log_artifact(path, "figures")`.

>>> from recsys.plots import training_curves
>>> training_curves({"train_loss": [0.7, 0.5, 0.4], "val_loss": [0.72, 0.6, 0.58],
...                  "val_auc": [0.62, 0.68, 0.7]}, "/tmp/curves.png", best_epoch=2)  # doctest: +SKIP
PosixPath('/tmp/curves.png')
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from features.core.manifest import atomic_file

SPLIT_PREFIXES = ("train", "val", "valid", "test", "eval")
DPI = 110
GOOD, BAD, NEUTRAL = "#2a9d4a", "#c0392b", "#7f8c8d"


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: str | Path) -> Path:
    """Write `fig` as PNG under a temp name in the target folder, then rename."""
    out = Path(path)
    with atomic_file(out) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)
    return out


def _split_name(key: str) -> tuple[str, str]:
    """'val_auc' -> ('auc', 'val'); 'train/loss' -> ('loss', 'train'); 'lr' -> ('lr', '')."""
    for sep in ("/", "_", "."):
        head, _, tail = key.partition(sep)
        if tail and head.lower() in SPLIT_PREFIXES:
            return tail, head
    return key, ""


def training_curves(
    history: Mapping[str, Sequence[float]],
    path: str | Path,
    *,
    title: str = "Training curves",
    xlabel: str = "epoch",
    best_epoch: int | None = None,
    epochs: Sequence[int] | None = None,
) -> Path:
    """One panel per metric, one line per split: `train_loss` and `val_loss`
    share the "loss" panel. `history`: metric -> value per epoch (epochs
    1..n unless `epochs` is given); `best_epoch` draws a dashed marker
    (the early-stopping choice)."""
    if not history:
        raise ValueError("training_curves: history is empty")
    panels: dict[str, list[tuple[str, str, Sequence[float]]]] = {}
    for key, values in history.items():
        metric, split = _split_name(key)
        panels.setdefault(metric, []).append((split or key, key, values))
    n = len(panels)
    cols = min(n, 3)
    rows = -(-n // cols)
    fig = _figure(4.2 * cols, 3.2 * rows)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax, (metric, lines) in zip(axes, panels.items()):
        for label, key, values in lines:
            y = np.asarray(values, dtype=float)
            x = np.asarray(epochs if epochs is not None else np.arange(1, len(y) + 1))
            if len(x) != len(y):
                raise ValueError(f"training_curves: {key!r} has {len(y)} values for {len(x)} epochs")
            ax.plot(x, y, marker="o" if len(y) <= 30 else None, markersize=3, label=label)
        if best_epoch is not None:
            ax.axvline(best_epoch, color=NEUTRAL, linestyle="--", linewidth=1, label=f"best epoch {best_epoch}")
        ax.set_title(metric)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in axes[n:]:
        ax.set_visible(False)
    fig.suptitle(title)
    return _save(fig, path)


def roc_points(y_true: Any, score: Any) -> tuple[np.ndarray, np.ndarray, float]:
    """(fpr, tpr, auc) with tied scores as one step (the trapezoid under ties)."""
    y = np.asarray(y_true, dtype=float).ravel()
    s = np.asarray(score, dtype=float).ravel()
    if y.shape != s.shape:
        raise ValueError(f"roc: y_true has {y.size} values, score has {s.size}")
    pos = float((y > 0).sum())
    neg = float(y.size - pos)
    if pos == 0 or neg == 0:
        raise ValueError("roc: needs both positive and negative labels")
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], (y[order] > 0).astype(float)
    last_of_tie = np.r_[np.nonzero(np.diff(s))[0], y.size - 1]
    tps = np.cumsum(y)[last_of_tie]
    fps = (last_of_tie + 1) - tps
    tpr = np.r_[0.0, tps / pos]
    fpr = np.r_[0.0, fps / neg]
    auc = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
    return fpr, tpr, auc


def roc_curves(
    arms: Mapping[str, tuple[Any, Any]],
    path: str | Path,
    *,
    title: str = "ROC curves",
) -> Path:
    """Several arms on one plot. `arms`: name -> (y_true, score); the legend
    carries each arm's AUC."""
    if not arms:
        raise ValueError("roc_curves: no arms")
    fig = _figure(5.5, 5.0)
    ax = fig.subplots()
    for name, (y_true, score) in arms.items():
        fpr, tpr, auc = roc_points(y_true, score)
        ax.plot(fpr, tpr, linewidth=1.6, label=f"{name} (AUC {auc:.3f})", drawstyle="default")
    ax.plot([0, 1], [0, 1], color=NEUTRAL, linestyle=":", linewidth=1, label="chance (AUC 0.500)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_aspect("equal")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def arm_deltas(
    deltas: Mapping[str, Mapping[str, tuple[float, float, float]]],
    path: str | Path,
    *,
    control: str = "control",
    title: str | None = None,
    unit: str = "",
) -> Path:
    """Metric-by-arm bars: the delta of each arm vs `control` with its
    confidence interval as error bars and a zero line. `deltas`: metric ->
    arm -> (delta, ci_low, ci_high). Green: CI above 0, red: below, grey:
    straddles 0 (no significant difference)."""
    if not deltas or not any(deltas.values()):
        raise ValueError("arm_deltas: no deltas")
    n = len(deltas)
    cols = min(n, 3)
    rows = -(-n // cols)
    n_arms = max(len(v) for v in deltas.values())
    fig = _figure(max(3.6, 1.1 * n_arms + 1.6) * cols, 3.6 * rows)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax, (metric, by_arm) in zip(axes, deltas.items()):
        names = list(by_arm)
        d = np.array([by_arm[a][0] for a in names], dtype=float)
        lo = np.array([by_arm[a][1] for a in names], dtype=float)
        hi = np.array([by_arm[a][2] for a in names], dtype=float)
        # a percentile interval need not contain the point delta (rare, with few
        # seeds): the bar still shows the interval, never a negative error bar
        colors = [GOOD if l > 0 else BAD if h < 0 else NEUTRAL for l, h in zip(lo, hi)]
        x = np.arange(len(names))
        ax.bar(x, d, color=colors, alpha=0.85, width=0.6)
        ax.errorbar(x, d, yerr=np.vstack([np.maximum(d - lo, 0), np.maximum(hi - d, 0)]), fmt="none", ecolor="black",
                    capsize=5, linewidth=1.2)
        ax.axhline(0.0, color="black", linewidth=0.9)
        span = float(np.max(hi) - np.min(lo)) or 1.0
        for xi, di, hi_i in zip(x, d, hi):
            ax.annotate(f"{di:+.4g}{unit}", (xi, hi_i + 0.03 * span), ha="center", va="bottom", fontsize=8)
        ax.set_ylim(min(0.0, float(np.min(lo))) - 0.08 * span, max(0.0, float(np.max(hi))) + 0.15 * span)
        ax.set_xticks(x, names, rotation=20 if len(names) > 4 else 0)
        ax.set_title(metric)
        ax.set_ylabel(f"Δ {metric} vs {control}" + (f" ({unit})" if unit else ""))
        ax.grid(axis="y", alpha=0.3)
    for ax in axes[n:]:
        ax.set_visible(False)
    fig.suptitle(title or f"Deltas vs {control} (bars: 95% CI)")
    return _save(fig, path)


def singular_spectrum(
    singular_values: Any,
    path: str | Path,
    *,
    rank: int | None = None,
    title: str = "Singular-value spectrum",
) -> Path:
    """Left: singular values (log scale); right: cumulative energy
    (sum of s_i^2 up to r / total) vs rank r. `rank` marks a chosen rank
    and annotates the energy it keeps."""
    s = np.sort(np.abs(np.asarray(singular_values, dtype=float).ravel()))[::-1]
    if s.size == 0 or not np.any(s > 0):
        raise ValueError("singular_spectrum: needs at least one non-zero singular value")
    if rank is not None and not 1 <= rank <= s.size:
        raise ValueError(f"singular_spectrum: rank {rank} outside 1..{s.size}")
    energy = np.cumsum(s**2) / np.sum(s**2)
    r = np.arange(1, s.size + 1)
    fig = _figure(10.0, 4.0)
    ax_s, ax_e = fig.subplots(1, 2)
    ax_s.semilogy(r, np.maximum(s, np.finfo(float).tiny), marker="." if s.size <= 100 else None)
    ax_s.set_xlabel("rank r")
    ax_s.set_ylabel("singular value σ_r (log)")
    ax_s.set_title("singular values")
    ax_s.grid(alpha=0.3, which="both")
    ax_e.plot(r, energy, linewidth=1.8)
    ax_e.set_ylim(0, 1.02)
    ax_e.set_xlabel("rank r")
    ax_e.set_ylabel("cumulative energy Σσ²≤r / Σσ²")
    ax_e.set_title("cumulative energy")
    ax_e.grid(alpha=0.3)
    if rank is not None:
        e = float(energy[rank - 1])
        for ax, y in ((ax_s, s[rank - 1]), (ax_e, e)):
            ax.axvline(rank, color=BAD, linestyle="--", linewidth=1)
            ax.plot([rank], [y], "o", color=BAD, markersize=7, zorder=5)
        ax_e.annotate(
            f"r={rank}: {100 * e:.1f}% energy", (rank, e), xytext=(10, -22), textcoords="offset points",
            color=BAD, fontsize=9,
        )
    fig.suptitle(title)
    return _save(fig, path)


def feature_importance(
    importance: Mapping[str, float],
    path: str | Path,
    *,
    top: int = 30,
    title: str = "Feature importance",
    xlabel: str = "importance (gain)",
) -> Path:
    """Horizontal bars, most important on top; only the `top` largest."""
    if not importance:
        raise ValueError("feature_importance: empty")
    items = sorted(importance.items(), key=lambda kv: float(kv[1]), reverse=True)[:top]
    names = [k for k, _ in items][::-1]
    vals = np.array([float(v) for _, v in items][::-1])
    fig = _figure(7.0, max(2.5, 0.32 * len(items) + 1.2))
    ax = fig.subplots()
    ax.barh(np.arange(len(names)), vals, color="#3b75af")
    ax.set_yticks(np.arange(len(names)), names, fontsize=8)
    ax.set_xlabel(xlabel)
    shown = f" (top {len(items)} of {len(importance)})" if len(importance) > len(items) else ""
    ax.set_title(title + shown)
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)


def cost_vs_size(rows: Sequence[Mapping[str, Any]], path: str | Path, *, title: str = "Feature build: cost against size") -> Path:
    """Seconds against events, one line per engine, log-log, from benchmark rows
    ({engine, events, seconds, ...}; a `startup_s` is drawn as a dotted floor).
    Rows of one engine are joined in order of size."""
    rows = [r for r in rows if r.get("seconds") and r.get("events")]
    if not rows:
        raise ValueError("cost_vs_size: no rows with events and seconds")
    fig = _figure(6.0, 4.0)
    ax = fig.subplots()
    for i, engine in enumerate(sorted({str(r["engine"]) for r in rows})):
        mine = sorted((r for r in rows if r["engine"] == engine), key=lambda r: r["events"])
        x = np.array([r["events"] for r in mine], dtype=float)
        y = np.array([r["seconds"] for r in mine], dtype=float)
        color = f"C{i}"
        ax.plot(x, y, "o-", color=color, label=engine)
        for xi, yi in zip(x, y):
            ax.annotate(f"{xi / yi / 1e3:,.0f}k ev/s", (xi, yi), textcoords="offset points", xytext=(4, -10), fontsize=7, color=color)
        startup = [r["startup_s"] for r in mine if r.get("startup_s")]
        if startup:
            ax.axhline(float(np.median(startup)), color=color, ls=":", lw=1, label=f"{engine} start-up")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.margins(x=0.15)  # room for the labels right of the largest size
    ax.set_xlabel("events")
    ax.set_ylabel("seconds, end to end (log)")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return _save(fig, path)


__all__ = ["training_curves", "roc_points", "roc_curves", "arm_deltas", "singular_spectrum", "feature_importance", "cost_vs_size"]
