"""The metrics of an evaluation as a text table."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from distill.jobs.artifacts import REASONS


def format_metrics(metrics: Mapping[str, Any], ks: tuple[int, ...] = (10, 50, 100)) -> str:
    """Recall table (models x warm/cold Recall@k) plus the diagnostics, as text.
    A metric that could not be computed (None) shows as n/a, with one line per
    reason (metrics["reasons"]) below. A `-` cell is a group the model does not
    serve (a teacher cannot rank cold items)."""
    models = []
    for key in metrics:
        if key.startswith("recall@"):
            name = key.split("_", 2)[2]
            if name not in models:
                models.append(name)
    cols = [f"{g}@{k}" for g in ("warm", "cold") for k in ks]
    w = max(len(m) for m in models) if models else 5
    lines = [f"{'model':<{w}}  " + "  ".join(f"{c:>8}" for c in cols)]
    for m in models:
        cells = []
        for g in ("warm", "cold"):
            for k in ks:
                v = metrics.get(f"recall@{k}_{g}_{m}")
                cell = "n/a" if v is None and f"recall@{k}_{g}_{m}" in metrics else "-"
                cells.append(f"{v:8.4f}" if isinstance(v, (int, float)) else f"{cell:>8}")
        lines.append(f"{m:<{w}}  " + "  ".join(cells))
    diag = {k: v for k, v in metrics.items() if k.split("_")[0] in {"nmi", "kendall", "topk", "bijective"}}
    if diag:
        lines.append("")
        w = max(map(len, diag))
        lines += [f"{k:<{w}}  {v:.4f}" if isinstance(v, (int, float)) else f"{k:<{w}}  n/a" for k, v in diag.items()]
    reasons: dict[str, int] = {}
    for k, why in (metrics.get(REASONS) or {}).items():
        if metrics.get(k, 0) is None:
            reasons[why] = reasons.get(why, 0) + 1
    if reasons:
        lines.append("")
        lines += [f"n/a ({n} metric{'s' if n > 1 else ''}): {why}" for why, n in reasons.items()]
    return "\n".join(lines)


def format_seeds(report: Mapping[str, Any]) -> str:
    """The multi-seed report (distill/jobs/seeds.py) as text: per-seed cold and
    warm Recall@k of each model with mean +- std, then each ratio's per-seed
    values, spread and bootstrap intervals."""
    k, seeds = report["k"], report["seeds"]
    keys = list(report["summary"])
    fmt = lambda v: f"{v:8.4f}" if isinstance(v, (int, float)) else f"{'n/a':>8}"  # noqa: E731
    w = max([len(x) for x in keys] + [10])
    lines = [f"{'metric':<{w}}  " + "  ".join(f"{'seed ' + str(s):>8}" for s in seeds) + f"  {'mean':>8}  {'std':>8}"]
    for key in keys:
        st = report["summary"][key]
        lines.append(f"{key:<{w}}  " + "  ".join(fmt(report["per_seed"][str(s)].get(key)) for s in seeds) + f"  {fmt(st['mean'])}  {fmt(st['std'])}")
    for name, r in report.get("ratios", {}).items():
        sp, ci, cu = r["spread"] or {}, r["pooled_ci_users_seeds"], r["pooled_ci_users"]
        lines.append(f"{'cold R@' + str(k) + ' ' + name:<{w}}  " + "  ".join(fmt(r["per_seed"][str(s)]) for s in seeds)
                     + f"  {fmt(sp.get('mean'))}  {fmt(sp.get('std'))}")  # fmt: skip
        lines.append(
            f"  pooled ratio {fmt(ci['ratio']).strip()}, 95% CI users+seeds [{fmt(ci['lo']).strip()}, {fmt(ci['hi']).strip()}], "
            f"users only [{fmt(cu['lo']).strip()}, {fmt(cu['hi']).strip()}], P(ratio <= 1) {fmt(ci['p_le_1']).strip()}"
        )
    return "\n".join(lines)


__all__ = ["format_metrics", "format_seeds"]
