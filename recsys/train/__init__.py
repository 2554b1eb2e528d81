"""Train and evaluate the ranker: one process, or DistributedModelParallel under torchrun.

    train_ranker(job, out_dir, tracker) -> metrics dict
        job: a RankJob (recsys.plan.plan_rank)
        writes out_dir/metrics.json and out_dir/predictions.parquet (rank 0)

    run          train_ranker: read the job's inputs, then `fit`
    loop         fit: epochs, divergence check, early stopping on valid GAUC
    distributed  WorkerContext (rank, world, device), DMP and the sharding plan
    checkpoint   last.pt / best.pt, atomic, and the key that decides a resume
    evaluate     predict, metrics.json + predictions.parquet, n/a formatting

Metrics of a predictions table come from
`recsys.eval.metrics.evaluate_predictions` (re-exported here).
"""

from features.core.errors import TrainingDiverged
from recsys.eval.metrics import evaluate_predictions
from recsys.train.distributed import WorkerContext, check_launch_env
from recsys.train.evaluate import CONTRACT_METRICS, PREDICTION_COLUMNS, metrics_line, predict
from recsys.train.loop import EARLY_STOP_METRIC, fit
from recsys.train.run import train_ranker

__all__ = [
    "CONTRACT_METRICS",
    "EARLY_STOP_METRIC",
    "PREDICTION_COLUMNS",
    "TrainingDiverged",
    "WorkerContext",
    "check_launch_env",
    "evaluate_predictions",
    "fit",
    "metrics_line",
    "predict",
    "train_ranker",
]
