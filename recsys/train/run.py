"""The ranker's training entry point: read the inputs a `RankJob` names, then `fit`.

    train_ranker(job, out_dir, tracker) -> metrics dict
        job: a RankJob (recsys.plan.plan_rank decides every input)
        writes out_dir/metrics.json and out_dir/predictions.parquet (rank 0)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from features.core.tracker import Tracker
from recsys.data import RankingData
from recsys.plan import RankJob
from recsys.train.loop import fit


def train_ranker(job: RankJob, out_dir: str | Path, tracker: Tracker | None = None) -> dict[str, Any]:
    """Load the features (+ match features, + distilled embeddings) the job
    names and `fit` (see `recsys.train`). The files were checked to exist by
    `recsys.plan.check_inputs`; a bad one is a DataError naming it."""
    data = RankingData.load(job.features, job.data, job.match, job.embeddings)
    return fit(data, job.model, job.train, out_dir, tracker, seed=job.seed)
