"""Model choice on the valid split, and the divergence check, shared by the
teachers and the student."""

from __future__ import annotations

import copy
import math

import numpy as np
from torch import nn

from features.core.errors import TrainingDiverged


def check_finite(value: float, what: str, epoch: int, step: int, hint: str) -> float:
    """`value` (a loss) unchanged when finite; else stop the run, naming the
    epoch and step (0-based, as in the logs) and the setting to look at."""
    if not math.isfinite(value):
        raise TrainingDiverged(f"{what}: the loss became {value} at epoch {epoch}, step {step}: training diverged; {hint}")
    return value


def check_finite_table(table: np.ndarray, what: str, epoch: int, hint: str) -> None:
    """Stop the run when a learned table holds a NaN or infinite entry."""
    if not np.isfinite(table).all():
        raise TrainingDiverged(f"{what}: the learned table holds NaN or infinite values after epoch {epoch}: training diverged; {hint}")


def best_score(curve: list[float]) -> float | None:
    """The best valid score of a curve; NaN epochs (a valid split with nothing
    to score) are left out, None when no epoch had a score."""
    scored = [v for v in curve if not math.isnan(v)]
    return max(scored) if scored else None


class BestOnValid:
    """Keeps the state of the best epoch by a higher-is-better valid score and
    says when `patience` epochs passed without a better one (0: never stop).
    Without scores (no valid function, or NaN: a valid split with nothing to
    score) it keeps nothing and never stops: every epoch runs and the last
    one is kept."""

    def __init__(self, patience: int) -> None:
        self.patience = patience
        self.best = -np.inf
        self.best_epoch = -1
        self.state: dict | None = None
        self.bad = 0

    def update(self, score: float, epoch: int, module: nn.Module) -> None:
        if math.isnan(score):
            return
        if score > self.best:
            self.best, self.best_epoch, self.bad = score, epoch, 0
            self.state = copy.deepcopy(module.state_dict())
        else:
            self.bad += 1

    @property
    def should_stop(self) -> bool:
        return bool(self.patience) and self.bad >= self.patience

    def restore(self, module: nn.Module, epochs_run: int) -> int:
        """Load the best state into `module`; return the chosen epoch (the
        last one when no score was ever given)."""
        if self.state is None:
            return epochs_run - 1
        module.load_state_dict(self.state)
        return self.best_epoch
