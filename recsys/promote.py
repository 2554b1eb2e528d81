"""Promote an A/B arm: move the registry alias `champion` to its models.

    promote_arm(tracking, "ab_match_features", "match", guard="gauc") -> Promotion

The guard recomputes the comparison of the newest finished run of the
experiment (`recsys.experiment_run.compare_experiment`, not logged) and
refuses (`Regression`, exit 1) when the arm's interval on the guarded metric
lies entirely on the worse side of zero over the whole test set (what
`recsys experiment compare --fail-on-regression` reports). An unknown
experiment, arm or metric, or an arm without a registered ranker (a LightGBM
arm, or a run that was not tracked) is a UsageError (exit 2). Aliases and
names: `recsys.tracking.models`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from features.core.errors import RecsysError, UsageError
from recsys.compare import ALL, CompareRow, regressions
from recsys.tracking.config import TrackingConfig


class Regression(RecsysError):
    """The arm regresses significantly on the guarded metric: not promoted (exit 1)."""

    exit_code = 1


@dataclass(frozen=True)
class Promotion:
    experiment: str
    arm: str
    control: str
    versions: dict[str, str]  # registered model -> version now aliased champion
    guard_row: CompareRow | None  # the arm's row of the guarded metric (segment "all"); None for the control


def promote_arm(tracking: TrackingConfig | Mapping[str, Any] | str, experiment: str, arm: str,
                guard: str | None = "gauc") -> Promotion:
    """Set `champion` on `arm`'s models of `experiment` unless `guard` regresses.

    `tracking`: the config's `tracking` section (a TrackingConfig, or a
    mapping of its keys), or a store URI."""
    from recsys.eval.metrics import METRICS

    if isinstance(tracking, str):
        tracking = TrackingConfig(uri=tracking)
    elif isinstance(tracking, Mapping):
        from features.core.config import from_dict

        tracking = from_dict(TrackingConfig, dict(tracking), where="tracking")
    elif not isinstance(tracking, TrackingConfig):
        raise TypeError(f"tracking: a TrackingConfig, a mapping of its keys or a store URI, got {type(tracking).__name__}")
    from recsys.experiment import check_experiment_name
    from recsys.experiment_run import compare_experiment, newest_run
    from recsys.tracking import connect
    from recsys.tracking.models import promote

    check_experiment_name(experiment, "experiment promote")
    if guard is not None and guard not in METRICS:
        raise UsageError(f"--guard: unknown metric {guard!r}; known: {', '.join(METRICS)}")
    parent, entries = newest_run(tracking, experiment)
    if guard is None:  # nothing to judge: no comparison (its bootstrap, its warnings about --n-boot)
        rows, control = [], (parent.get("tags") or {}).get("control", "control")
        arms = sorted({e["arm"] for e in entries} | {control})
    else:  # the experiment's own metrics, so the guard sees exactly what `compare` shows
        rows, control = compare_experiment(tracking, experiment, log_to_store=False)
        if not any(r.metric == guard for r in rows):
            rows, control = compare_experiment(tracking, experiment, metrics=(guard,), log_to_store=False)
        arms = sorted({r.arm for r in rows} | {control})
    if arm not in arms:
        raise UsageError(f"--arm {arm!r}: not an arm of experiment {experiment!r}; its arms: {', '.join(arms)}")
    row = next((r for r in rows if guard and r.arm == arm and r.metric == guard and r.segment == ALL), None)
    if guard:
        bad = [r for r in regressions(rows, guard, control) if r.arm == arm]
        if bad:
            r = bad[0]
            raise Regression(f"not promoted: arm {arm!r} regresses on {guard} vs {control!r}: "
                             f"{r.delta:+.4f} [{r.ci_low:+.4f}, {r.ci_high:+.4f}]: the 95% interval lies on the worse side of zero")
    # the arm's models of the run the guard judged (its first seed), not whatever its aliases point at now
    first = next((int(x) for x in json.loads((parent.get("params") or {}).get("seeds", "[]"))), None)
    mine = [e for e in entries if e["arm"] == arm]
    entry = next((e for e in mine if int(e["seed"]) == first), mine[0] if mine else None)
    moved = promote(connect(tracking).client, experiment, arm, entry["outputs"] if entry else None)
    if not moved:
        raise UsageError(f"arm {arm!r} of {experiment!r} has no registered recsys-ranker (alias "
                         f"{experiment}-{arm}): a LightGBM arm, or a run that was not tracked")
    return Promotion(experiment, arm, control, {n: ref.version for n, ref in moved.items()}, row)


__all__ = ["Promotion", "Regression", "promote_arm"]
