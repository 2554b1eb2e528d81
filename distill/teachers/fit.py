"""The one epoch loop both teachers train with: shuffled minibatches, the
divergence checks, the loss curve, the valid score and early stopping on it
(distill/early_stopping.py), one tracker line and one progress bar per epoch.

What differs between teachers is passed in: the minibatch loss (`step`), how
the learned table is published after an epoch (`publish`) and the valid
score (`valid`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from distill.early_stopping import BestOnValid, check_finite, check_finite_table
from features.core.tracker import Tracker


@dataclass(frozen=True)
class EpochPlan:
    """How long and in what steps one teacher trains."""

    name: str  # "id2item": metric keys `teachers/{name}/...`, messages "{name} teacher"
    epochs: int  # at most
    batch_size: int  # examples per step
    patience: int  # epochs without a better valid score before stopping (0: never)
    hint: str  # the setting to look at when training diverges
    label: str = ""  # progress bar text (default "{name} teacher")


@dataclass
class TeacherFit:
    """What the loop learned besides the module's weights."""

    loss_curve: list[float] = field(default_factory=list)  # mean loss per epoch
    valid_curve: list[float] = field(default_factory=list)  # valid score per epoch (empty without `valid`)
    best_epoch: int = -1  # the epoch whose weights the module holds after the fit


def fit_teacher(
    module: nn.Module,
    opt: torch.optim.Optimizer,
    plan: EpochPlan,
    n_examples: int,
    step: Callable[[np.ndarray], tuple[torch.Tensor, int]],
    *,
    rng: np.random.Generator,
    publish: Callable[[], np.ndarray],
    valid: Callable[[], float] | None,
    tracker: Tracker,
    progress: bool,
) -> TeacherFit:
    """Train `module` for up to `plan.epochs` epochs; leave it holding the best
    epoch's weights (by `valid`, higher is better; the last epoch without one).

    `step(rows)` gets the example indices of one minibatch (a slice of a fresh
    `rng` permutation each epoch) and returns (loss, weight); the epoch's loss
    is the weight-averaged step loss. After each epoch `publish()` stores the
    learned state on the teacher and returns its item table (checked finite),
    then `valid()` scores it. `module` is in train mode during steps.
    """
    from tqdm.auto import tqdm

    what = f"{plan.name} teacher"
    fit = TeacherFit()
    stopper = BestOnValid(plan.patience)
    bar = tqdm(range(plan.epochs), desc=plan.label or what, unit="epoch", disable=None if progress else True)
    for epoch in bar:
        module.train()
        order = rng.permutation(n_examples)
        total, count = 0.0, 0
        for i, s in enumerate(range(0, len(order), plan.batch_size)):
            loss, weight = step(order[s : s + plan.batch_size])
            value = check_finite(float(loss.detach()), what, epoch, i, plan.hint)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += value * weight
            count += weight
        fit.loss_curve.append(total / max(count, 1))
        check_finite_table(publish(), what, epoch, plan.hint)
        metrics = {f"teachers/{plan.name}/loss": fit.loss_curve[-1]}
        if valid is not None:
            score = float(valid())
            fit.valid_curve.append(score)
            metrics[f"teachers/{plan.name}/valid"] = score
            stopper.update(score, epoch, module)
        tracker.log_metrics(metrics, step=epoch)
        bar.set_postfix(loss=f"{fit.loss_curve[-1]:.4f}", valid=f"{fit.valid_curve[-1]:.4f}" if fit.valid_curve else "-")
        if stopper.should_stop:
            break
    fit.best_epoch = stopper.restore(module, len(fit.loss_curve))
    return fit


__all__ = ["EpochPlan", "TeacherFit", "fit_teacher"]
