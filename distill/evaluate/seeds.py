"""Multi-seed summaries and the paired bootstrap interval of a recall ratio.

A seed changes every random choice of a run: which items are held out
(test-cold and pseudo-cold), the teachers' and the student's initialisation
and batches. The interval of the student/content cold-Recall@k ratio
therefore resamples both users and seeds (a replicate draws users with
replacement, the same draw in every seed, and seeds with replacement), so it
covers every source of randomness the runs vary; the users-only interval is
reported beside it. Pure functions of arrays.

Shape legend:
    N  impressions (all seeds stacked), S seeds, U users, R bootstrap replicates
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


def cell_sums(hits: np.ndarray, users: np.ndarray, seeds: np.ndarray, n_users: int, n_seeds: int) -> np.ndarray:
    """(S, U) number of hits per (seed, user) cell from per-impression flags."""
    out = np.zeros((n_seeds, n_users), dtype=np.float64)
    np.add.at(out, (seeds, users), np.asarray(hits, dtype=np.float64))
    return out


def bootstrap_ratio(
    hits_a: np.ndarray,
    hits_b: np.ndarray,
    users: np.ndarray,
    seeds: np.ndarray,
    *,
    n_boot: int = 2000,
    level: float = 0.95,
    rng: np.random.Generator,
    resample_seeds: bool = True,
) -> dict[str, float]:
    """sum(hits_a) / sum(hits_b) over the same impressions (paired), with a
    percentile bootstrap interval over users (and seeds, when
    `resample_seeds`). hits_a, hits_b, users, seeds: (N,); users and seeds are
    any integer labels. Returns {"ratio", "lo", "hi", "p_le_1"} where p_le_1
    is the share of replicates whose ratio is <= 1; nan when b never hits."""
    _, u = np.unique(users, return_inverse=True)
    _, s = np.unique(seeds, return_inverse=True)
    n_u, n_s = int(u.max(initial=-1)) + 1, int(s.max(initial=-1)) + 1
    a = cell_sums(hits_a, u, s, n_u, n_s)  # (S, U)
    b = cell_sums(hits_b, u, s, n_u, n_s)  # (S, U)
    nan = {"ratio": float("nan"), "lo": float("nan"), "hi": float("nan"), "p_le_1": float("nan")}
    if b.sum() == 0:
        return nan
    w_u = rng.multinomial(n_u, np.full(n_u, 1 / n_u), size=n_boot).astype(np.float64)  # (R, U)
    if resample_seeds:
        w_s = rng.multinomial(n_s, np.full(n_s, 1 / n_s), size=n_boot).astype(np.float64)  # (R, S)
    else:
        w_s = np.ones((n_boot, n_s))
    num = ((w_s @ a) * w_u).sum(1)  # (R,)
    den = ((w_s @ b) * w_u).sum(1)  # (R,)
    ok = den > 0
    ratios = num[ok] / den[ok]
    alpha = (1 - level) / 2
    lo, hi = np.quantile(ratios, [alpha, 1 - alpha]) if len(ratios) else (float("nan"), float("nan"))
    return {"ratio": float(a.sum() / b.sum()), "lo": float(lo), "hi": float(hi), "p_le_1": float((ratios <= 1).mean())}


def spread(values: Sequence[float]) -> dict[str, float]:
    """{"mean", "std" (ddof 1; 0 for one value), "min", "max"} of per-seed values (nan skipped)."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=np.float64)
    if len(v) == 0:
        return {"mean": float("nan"), "std": float("nan"), "min": float("nan"), "max": float("nan")}
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "min": float(v.min()), "max": float(v.max())}


def summarise(per_seed: Mapping[int, Mapping[str, float]], keys: Sequence[str]) -> dict[str, dict[str, float]]:
    """{key: spread of that metric over the seeds} for the keys every seed reports."""
    return {k: spread([m.get(k) for m in per_seed.values()]) for k in keys if all(k in m for m in per_seed.values())}


__all__ = ["cell_sums", "bootstrap_ratio", "spread", "summarise"]
