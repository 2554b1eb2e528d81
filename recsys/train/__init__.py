"""Train and evaluate the ranker: one process, or DistributedModelParallel under torchrun.

    train_ranker(cfg, out_dir, tracker) -> metrics dict
        cfg: a PipelineConfig (or anything with .paths, .ranker, .train, .seed)
        writes out_dir/metrics.json and out_dir/predictions.parquet (rank 0)

    config       TrainConfig (the `train` section; imports no torch)
    run          train_ranker, ranker_inputs, data_config: the stage entry point
    loop         fit: epochs, divergence check, early stopping on valid GAUC
    distributed  WorkerContext (rank, world, device), DMP and the sharding plan
    checkpoint   last.pt / best.pt, atomic, and the key that decides a resume
    evaluate     predict, metrics.json + predictions.parquet, n/a formatting

Metrics of a predictions table come from
`recsys.eval.metrics.evaluate_predictions` (re-exported here).
"""

from features.core.errors import TrainingDiverged
from recsys.eval.metrics import evaluate_predictions
from recsys.train.config import DEVICES, OPTIMIZERS, TrainConfig
from recsys.train.distributed import WorkerContext, check_launch_env
from recsys.train.evaluate import CONTRACT_METRICS, PREDICTION_COLUMNS, metrics_line, predict
from recsys.train.loop import EARLY_STOP_METRIC, fit
from recsys.train.run import data_config, ranker_inputs, train_ranker

__all__ = [
    "CONTRACT_METRICS",
    "DEVICES",
    "EARLY_STOP_METRIC",
    "OPTIMIZERS",
    "PREDICTION_COLUMNS",
    "TrainConfig",
    "TrainingDiverged",
    "WorkerContext",
    "check_launch_env",
    "data_config",
    "evaluate_predictions",
    "fit",
    "metrics_line",
    "predict",
    "ranker_inputs",
    "train_ranker",
]
