"""Scoring a split, and the run's result files.

`predict` gives the predictions table of a split (every impression once, in
interactions.parquet order; under DMP gathered from every rank and
de-duplicated). Metrics come from `recsys.eval.metrics.evaluate_predictions`;
one that cannot be computed (no rows, one class, no observed LT rows) is NaN,
written as null in metrics.json with its reason under "reasons", printed as
n/a. A NaN or inf score stops the run with `TrainingDiverged`.

`write_results` replaces out_dir/predictions.parquet and metrics.json as a
pair at the very end of a run.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from torch import nn

from features import schemas as S
from features.core.errors import TrainingDiverged
from features.core.manifest import atomic_file
from features.core.numeric import json_safe
from features.core.tracker import Tracker
from recsys.data import RankingData
from recsys.eval.metrics import format_metric
from recsys.models.ranker import probabilities
from recsys.modules.svd_attention import SVDFactorizationError
from recsys.train.distributed import WorkerContext

PREDICTION_COLUMNS = (
    S.USER_ID, S.ITEM_ID, S.TIMESTAMP, S.LABEL, "score", "lt_score",
    S.RETURNED_1D, S.ACTIVE_DAYS_7, S.LT_OBSERVED, S.HIST_LEN,
)
CONTRACT_METRICS = ("auc", "gauc", "logloss", "lt_auc", "lt_spearman")


@torch.no_grad()
def predict(tr_module: nn.Module, data: RankingData, split: str, batch_size: int,
            ctx: WorkerContext | None = None) -> pl.DataFrame:
    """Predictions table (PREDICTION_COLUMNS) of every impression of a split,
    in interactions.parquet order (sampled negatives never included)."""
    ctx = ctx or WorkerContext()
    tr_module.eval()
    rows, scores, lts = [], [], []
    for batch in data.iter_batches(split, batch_size, rank=ctx.rank, world_size=ctx.world_size):
        try:
            _, parts = tr_module(batch.to(ctx.device))
        except SVDFactorizationError as e:
            raise TrainingDiverged(f"evaluation on {split}: {e}") from e
        rows.append(batch.row_ids.numpy())
        scores.append(probabilities(parts.logits.click))
        lts.append(probabilities(parts.logits.lt))
    cat = [np.concatenate(x) if x else np.zeros(0) for x in (rows, scores, lts)]
    if ctx.distributed:
        import torch.distributed as dist

        gathered: list[Any] = [None] * ctx.world_size
        dist.all_gather_object(gathered, cat)
        cat = [np.concatenate([g[i] for g in gathered]) for i in range(3)]
    row, score, lt = cat
    row = row.astype(np.int64)
    keep = row >= 0
    row, score, lt = row[keep], score[keep], lt[keep]
    bad = ~(np.isfinite(score) & np.isfinite(lt))
    if bad.any():
        raise TrainingDiverged(
            f"evaluation on {split}: {int(bad.sum())} of {len(score)} scores are NaN or inf: the model diverged; "
            "lower train.lr / train.sparse_lr"
        )
    row, first = np.unique(row, return_index=True)  # sorted, de-duplicated (padding of shares)
    frame = data.prediction_frame(row).with_columns(
        pl.Series("score", score[first]), pl.Series("lt_score", lt[first])
    )
    return frame.select(PREDICTION_COLUMNS)


def metrics_line(metrics: Mapping[str, Any], names: tuple[str, ...] = ("auc", "gauc", "logloss")) -> str:
    """`auc 0.7012 gauc n/a (no user has both ...) logloss 0.6611`."""
    reasons = metrics.get("reasons") or {}
    parts = []
    for name in names:
        text = f"{name} {format_metric(metrics.get(name))}"
        if name in reasons and format_metric(metrics.get(name)) == "n/a":
            text += f" ({reasons[name]})"
        parts.append(text)
    return " ".join(parts)


def run_metrics(test: Mapping[str, Any], valid: Mapping[str, Any], **run: Any) -> dict[str, Any]:
    """metrics.json of a run: the contract metrics of test first, then their
    reasons, test size, AUC by activity, the valid metrics and `run` facts."""
    metrics: dict[str, Any] = {k: test[k] for k in CONTRACT_METRICS}
    metrics.update(
        reasons=test["reasons"],
        n_test=test["n"],
        auc_by_activity=test["auc_by_activity"],
        valid={k: v for k, v in valid.items() if k != "n"},
        **run,
    )
    return metrics


def write_results(out: Path, test_pred: pl.DataFrame, metrics: Mapping[str, Any], tracker: Tracker) -> None:
    """Replace predictions.parquet and metrics.json in `out` together and log them.

    Both files are written in full beside their final names before either is
    renamed, predictions first: a failure leaves the previous pair (or none),
    never a new predictions file with old metrics."""
    pred_path, metrics_path = out / S.PREDICTIONS_FILE, out / S.METRICS_FILE
    with atomic_file(metrics_path) as tmp_metrics, atomic_file(pred_path) as tmp_pred:
        test_pred.write_parquet(tmp_pred)
        tmp_metrics.write_text(json.dumps(json_safe(metrics), indent=2, allow_nan=False) + "\n")
    tracker.log_metrics({f"test_{k}": float(metrics[k]) for k in CONTRACT_METRICS
                         if metrics[k] is not None and np.isfinite(metrics[k])})
    speed = metrics.get("train_samples_per_s")
    if speed is not None and np.isfinite(speed):
        tracker.log_metrics({"train_samples_per_s": float(speed)})
    tracker.log_artifact(metrics_path)
    tracker.log_artifact(pred_path)
