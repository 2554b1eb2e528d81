"""DistributedModelParallel on CPU: 2 processes (torch.multiprocessing spawn,
gloo on a free 127.0.0.1 port, bounded timeouts), tables sharded by the
planner; valid AUC within 0.01 of single-process training on the same config."""

from __future__ import annotations

import json
import os
import socket
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch.multiprocessing as mp

from recsys.config import PipelineConfig
from recsys.plan import RankJob, plan_rank

TIMEOUT_S = 150
WORLD = 2


def _config(features: str, world_batch: int = 128, epochs: int = 2, resume: bool = False) -> RankJob:
    return plan_rank(PipelineConfig.from_mapping({
        "seed": 0,
        "paths": {"features": features},
        "data": {"history_cap": 50},
        "ranker": {"embedding_dim": 8, "svd_rank": 4, "history_encoder": "svd_compact",
                   "dense_arch_layer_sizes": [8], "over_arch_layer_sizes": [16, 8]},
        "train": {"epochs": epochs, "batch_size": world_batch, "progress": False, "patience": 0, "resume": resume},
    }))


def _worker(rank: int, world: int, port: int, features: str, out: str) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=TIMEOUT_S))
    try:
        from recsys.stages import run_rank

        run_rank(_config(features), None, out, log=lambda _m: None)  # the stage: training, manifest, registration
        if rank == 0:  # only rank 0 writes the outputs
            metrics = json.loads(Path(out, "metrics.json").read_text())
            Path(out, "dist.json").write_text(json.dumps({"valid_auc": metrics["valid"]["auc"],
                                                          "world_size": metrics["world_size"],
                                                          "sharding": metrics["sharding"]}))
    finally:
        dist.destroy_process_group()


def _train_worker(rank: int, world: int, port: int, features: str, out: str, epochs: int) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=TIMEOUT_S))
    try:
        from recsys.train import train_ranker

        train_ranker(_config(features, epochs=epochs, resume=True), out)
    finally:
        dist.destroy_process_group()


def _spawn(fn, *args) -> None:
    ctx = mp.start_processes(fn, args=(WORLD, _free_port(), *args), nprocs=WORLD, start_method="spawn", join=False)
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not ctx.join(timeout=2):
            if time.monotonic() > deadline:
                pytest.fail(f"distributed training did not finish in {TIMEOUT_S}s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()


def test_ranks_whose_checkpoints_disagree_start_fresh_instead_of_hanging(synthetic_features, tmp_path, capfd):
    """A probe (2026-12-01): rank 1's last checkpoint deleted (or a rank killed
    between two ranks' saves): rank 0 resumed, rank 1 started fresh, and the
    run hung at the first collective only one rank reached."""
    out = tmp_path / "dist"
    _spawn(_train_worker, str(synthetic_features), str(out), 1)
    (out / "checkpoints" / f"last.rank1of{WORLD}.pt").unlink()
    _spawn(_train_worker, str(synthetic_features), str(out), 2)
    err = capfd.readouterr().err
    assert "not all after the same epoch; starting fresh" in err and "resumed from" not in err
    assert json.loads((out / "metrics.json").read_text())["epochs_run"] == 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_dmp_two_processes_matches_single_process(synthetic_features, tmp_path):
    from recsys.train import train_ranker

    out = tmp_path / "dist"
    stale = out / "checkpoints" / "best.pt"  # a single-process run's model left in the folder
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"another run's model")
    _spawn(_worker, str(synthetic_features), str(out))
    dist_metrics = json.loads((out / "dist.json").read_text())
    assert dist_metrics["world_size"] == WORLD
    # every table sharded by the planner, with a sharding type that works on CPU
    sharding = dist_metrics["sharding"]
    assert {"item", "user_segment", "item_category", "item_tags"} <= set(sharding)
    assert sharding["item"].split()[0] in {"table_wise", "row_wise", "column_wise"}
    for table, how in sharding.items():
        assert how.split()[0] in {"table_wise", "row_wise", "column_wise", "table_column_wise"}, (table, how)
    assert (out / "metrics.json").exists() and (out / "predictions.parquet").exists()
    assert (out / "checkpoints" / f"last.rank0of{WORLD}.pt").exists()
    assert (out / "checkpoints" / f"last.rank1of{WORLD}.pt").exists()
    # a probe (2026-12-01): the stale best.pt was recorded in the manifest and registered as this run's model
    assert not stale.exists() and json.loads((out / "manifest.json").read_text())["best_checkpoint"] is None

    single = train_ranker(_config(str(synthetic_features)), tmp_path / "single")
    assert single["world_size"] == 1
    assert abs(dist_metrics["valid_auc"] - single["valid"]["auc"]) < 0.01, (dist_metrics, single["valid"]["auc"])
