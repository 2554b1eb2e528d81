"""The training loop: epochs, the divergence check, early stopping.

Epochs over shuffled training requests (tqdm bar on rank 0), the valid split
evaluated after every epoch, early stopping on valid GAUC (patience in
epochs), the best epoch's weights evaluated on test. Sparse tables learn with
row-wise Adagrad (`sparse_lr`), the dense part with `optimizer` (`lr`).

Determinism: weights come from a torch.Generator seeded with the seed, the
shuffle of epoch e from np.random.default_rng([seed, e]) and sampled
negatives from default_rng([seed, e, 1, rank]); nothing reads a global RNG,
so the same seed gives the same metrics, and a run resumed from the
checkpoint of epoch e continues exactly like an uninterrupted one.

Honest failure: a NaN or inf loss or dense gradient (checked after each
backward, before the optimiser step) stops the run with `TrainingDiverged`
(exit 1) naming the epoch and step. Train, valid and test must all have
rows, and train both click labels.

Distributed: each rank reads `batch_size // world_size` requests of every
step (interleaved shares of the same permutation); losses and the
divergence flag are all-reduced.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from features import schemas as S
from features.core.config import flatten, to_dict
from features.core.errors import DataError, TrainingDiverged
from features.core.numeric import torch_threads
from features.core.tracker import NullTracker, Tracker
from recsys.data import RankingData
from recsys.eval.metrics import METRICS, constant_scores_warning, evaluate_predictions
from recsys.config.sections import RankerConfig, TrainConfig
from recsys.models.ranker import Ranker
from recsys.modules.svd_attention import SVDFactorizationError
from recsys.train import checkpoint
from recsys.train.distributed import Trainable, WorkerContext, build_trainable, worker_context
from recsys.train.evaluate import metrics_line, predict, run_metrics, write_results

EARLY_STOP_METRIC = "gauc"
# when valid GAUC cannot be computed (no valid user has both a positive and a
# negative label: one valid impression per user under --split leave_last_out),
# early stopping reads valid AUC; the labels are fixed, so the first epoch decides
EARLY_STOP_FALLBACK = "auc"


def _progress(it: Iterator, total: int, desc: str, enabled: bool) -> Iterator:
    from tqdm import tqdm

    return tqdm(it, total=total, desc=desc, disable=None if enabled else True, leave=False, file=sys.stderr, mininterval=1.0)


def _train_epoch(tr: Trainable, data: RankingData, cfg: TrainConfig, seed: int, epoch: int,
                 ctx: WorkerContext) -> dict[str, float]:
    tr.module.train()
    shuffle = np.random.default_rng([seed, epoch])
    negatives = np.random.default_rng([seed, epoch, 1, ctx.rank]) if data.config.negatives_per_request else None
    total = data.n_batches("train", cfg.batch_size, ctx.world_size)
    if cfg.max_batches_per_epoch:
        total = min(total, cfg.max_batches_per_epoch)
    batches = data.iter_batches("train", cfg.batch_size, shuffle=shuffle, negatives=negatives, rank=ctx.rank,
                                world_size=ctx.world_size, max_batches=cfg.max_batches_per_epoch)
    sums = np.zeros(3)
    n = 0
    samples = 0  # candidates trained on (the samples of samples/s)
    bar = _progress(batches, total, f"epoch {epoch + 1}/{cfg.epochs}", cfg.progress and ctx.is_main)
    for step, batch in enumerate(bar, start=1):
        batch = batch.to(ctx.device)
        where = f"epoch {epoch + 1}, step {step}"
        try:
            loss, parts = tr.module(batch)
        except SVDFactorizationError as e:
            raise TrainingDiverged(f"{where}: {e}") from e
        tr.dense_opt.zero_grad(set_to_none=True)
        if not ctx.distributed:
            tr.sparse_opt.zero_grad(set_to_none=True)
        loss.backward()
        _check_step(tr, loss, where, ctx, cfg)
        tr.dense_opt.step()
        if not ctx.distributed:  # under DMP the fused optimiser ran inside backward
            tr.sparse_opt.step()
        sums += [float(parts.loss), float(parts.click_loss), float(parts.lt_loss)]
        n += 1
        samples += batch.n_candidates
        if n % 20 == 0:
            bar.set_postfix(loss=f"{sums[0] / n:.4f}")
    if ctx.distributed:
        import torch.distributed as dist

        t = torch.tensor([*sums, n, samples], dtype=torch.float64)
        dist.all_reduce(t)
        sums, n, samples = t[:3].numpy(), int(t[3]), int(t[4])
    n = max(n, 1)
    return {"train_loss": sums[0] / n, "train_click_loss": sums[1] / n, "train_lt_loss": sums[2] / n,
            "train_samples": samples}


def _check_step(tr: Trainable, loss: Tensor, where: str, ctx: WorkerContext, cfg: TrainConfig) -> None:
    """Stop on a non-finite loss or dense gradient, before the optimiser step
    spreads it into the weights. Under DMP the flag is all-reduced, so every
    rank stops at the same step (one rank raising alone would hang the rest)."""
    grads = [p.grad for group in tr.dense_opt.param_groups for p in group["params"] if p.grad is not None]
    grad_ok = torch.stack([g.detach().abs().max() for g in grads]).isfinite().all() if grads else torch.tensor(True)
    flags = torch.stack([(~loss.detach().isfinite()).float().cpu(), (~grad_ok).float().cpu()])  # (2,)
    if ctx.distributed:
        import torch.distributed as dist

        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    if flags[0] > 0 or flags[1] > 0:
        what = "loss" if flags[0] > 0 else "gradient"
        raise TrainingDiverged(
            f"{where}: the training {what} is NaN or inf (lr {cfg.lr:g}, sparse_lr {cfg.sparse_lr:g}): "
            "training diverged; lower train.lr / train.sparse_lr, or check the input features"
        )


def _check_splits(data: RankingData) -> None:
    """Rows in every split, and both click labels in train: otherwise there is
    nothing to learn or to report (a DataError naming the file and column)."""
    file = data.interactions_file
    for split in S.SPLITS:
        if not len(data.requests(split)):
            raise DataError(f"the {split} split has no rows: the ranker needs rows in train, valid and test "
                            "(more data, or other valid_frac/test_frac)", file=file, column=S.SPLIT)
    labels = data.imp_label[data.impressions(data.requests("train"))]
    if labels.min() == labels.max():
        raise DataError(f"every train row has {S.LABEL} = {int(labels[0])} ({len(labels)} rows): nothing to learn "
                        "(ratings: check features.label_threshold of `recsys features build`; implicit data: add the "
                        "impressions that were not clicked, label 0)", file=file, column=S.LABEL)


def _better(new: float, best: float | None, min_delta: float, metric: str = EARLY_STOP_METRIC) -> bool:
    if best is None:
        return bool(np.isfinite(new))
    if not np.isfinite(new):
        return False
    sign = 1.0 if METRICS[metric].higher_is_better else -1.0
    return sign * (new - best) > min_delta


def _stop_metric(valid: dict[str, Any]) -> str | None:
    """The valid metric early stopping reads (module constants): GAUC, else
    AUC, else None (every epoch runs and the last is kept)."""
    for name in (EARLY_STOP_METRIC, EARLY_STOP_FALLBACK):
        v = valid.get(name)
        if v is not None and np.isfinite(v):
            return name
    return None


def fit(
    data: RankingData,
    ranker: RankerConfig,
    train: TrainConfig,
    out_dir: str | Path,
    tracker: Tracker | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Train on `data`, evaluate valid every epoch and test at the end; write
    metrics.json and predictions.parquet into out_dir (rank 0); return metrics.
    Torch runs on `train.num_threads` threads meanwhile (0: as set)."""
    out, existed = Path(out_dir), Path(out_dir).exists()
    try:
        with torch_threads(train.num_threads, faiss_too=False):
            return _fit(data, ranker, train, out_dir, tracker or NullTracker(), seed)
    except BaseException:
        # a run that failed before writing anything leaves no empty folder behind
        # (a checkpoint it wrote stays: `train.resume` continues from it)
        for folder in (out / "checkpoints", out):
            if not existed and folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        raise


def _fit(data: RankingData, ranker: RankerConfig, train: TrainConfig, out_dir: str | Path, tracker: Tracker,
         seed: int) -> dict[str, Any]:
    t_start = time.perf_counter()
    _check_splits(data)
    ctx = worker_context(train)
    out = Path(out_dir)
    ckpt_dir = train.checkpoints(out)
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        tracker.log_params(flatten({"ranker": to_dict(ranker), "train": to_dict(train), "seed": seed}))
    generator = torch.Generator().manual_seed(seed)
    model = Ranker(ranker, data.spec, data.item_embeddings, generator)
    tr = build_trainable(model, train, ctx)
    key = checkpoint.resume_key(ranker, train, seed, data, ctx.world_size)
    last_path = ckpt_dir / checkpoint.checkpoint_name("last", ctx)
    best_path = ckpt_dir / checkpoint.checkpoint_name("best", ctx)
    state = checkpoint.resume(last_path, best_path, tr, key, ctx, train.resume, train.epochs) or {
        "epoch": 0, "best": None, "best_epoch": -1, "bad_epochs": 0, "stopped": False, "history": [],
        "train_seconds": 0.0, "train_samples": 0}

    while state["epoch"] < train.epochs and not state["stopped"]:
        epoch = state["epoch"]
        t0 = time.perf_counter()
        losses = _train_epoch(tr, data, train, seed, epoch, ctx)
        try:
            valid = evaluate_predictions(predict(tr.module, data, "valid", train.eval_batch_size, ctx))
        except TrainingDiverged as e:
            raise TrainingDiverged(f"epoch {epoch + 1}, {e}") from e
        seconds = time.perf_counter() - t0
        row = {"epoch": epoch + 1, **losses,
               **{f"valid_{k}": v for k, v in valid.items() if k not in ("auc_by_activity", "reasons")},
               "epoch_seconds": seconds}
        state["history"].append(row)
        state["train_seconds"] += seconds
        state["train_samples"] = state.get("train_samples", 0) + losses["train_samples"]  # (a resumed older state has none)
        if "stop_metric" not in state:  # chosen once, on the first epoch's valid metrics
            state["stop_metric"] = _stop_metric(valid)
            if ctx.is_main and state["stop_metric"] != EARLY_STOP_METRIC:
                why = (valid.get("reasons") or {}).get(EARLY_STOP_METRIC, "n/a")
                print(f"early stopping on valid {state['stop_metric'] or 'nothing: every epoch runs, the last is kept'}"
                      f" (valid {EARLY_STOP_METRIC} is n/a: {why})", file=sys.stderr)
        metric = state["stop_metric"]
        score = valid[metric] if metric is not None else float("nan")
        if _better(score, state["best"], train.min_delta, metric or EARLY_STOP_METRIC):
            state.update(best=float(score), best_epoch=epoch + 1, bad_epochs=0)
            checkpoint.save_best(best_path, tr, epoch + 1)
        elif np.isfinite(score):  # an n/a valid GAUC is no evidence either way: no early stop on it
            state["bad_epochs"] += 1
            if train.patience and state["bad_epochs"] >= train.patience:
                state["stopped"] = True
        state["epoch"] = epoch + 1
        if ctx.is_main:
            tracker.log_metrics({k: float(v) for k, v in row.items() if k != "epoch" and v is not None
                                 and np.isfinite(v)}, step=epoch + 1)
            print(f"epoch {epoch + 1}: loss {losses['train_loss']:.4f} valid {metrics_line(valid, ('auc', 'gauc'))} "
                  f"({seconds:.1f}s)", file=sys.stderr)
        checkpoint.save_last(last_path, tr, key, state)

    if state["best_epoch"] < 0 and state["epoch"]:  # no valid score to choose on: the last epoch is the model kept
        state["best_epoch"] = state["epoch"]
        if not ctx.distributed:  # (a scorer, and the MLflow model, read best.pt)
            checkpoint.save_best(best_path, tr, state["epoch"])
    if best_path.exists():
        checkpoint.load_best(best_path, tr)
    valid_pred = predict(tr.module, data, "valid", train.eval_batch_size, ctx)
    test_pred = predict(tr.module, data, "test", train.eval_batch_size, ctx)
    metrics = run_metrics(
        evaluate_predictions(test_pred), evaluate_predictions(valid_pred),
        best_epoch=state["best_epoch"],
        early_stop_metric=state.get("stop_metric"),
        epochs_run=state["epoch"],
        stopped_early=state["stopped"],
        history=state["history"],
        train_seconds=state["train_seconds"],
        # candidates trained on per second of epoch time (training and the valid pass that ends each epoch)
        train_samples=state.get("train_samples", 0),
        train_samples_per_s=state.get("train_samples", 0) / state["train_seconds"] if state["train_seconds"] > 0 else None,
        seconds=time.perf_counter() - t_start,
        history_encoder=ranker.history_encoder,
        world_size=ctx.world_size,
        sharding=tr.sharding,
        seed=seed,
        match_features=list(data.match_columns),
        config_hash=key,
    )
    if ctx.is_main:
        write_results(out, test_pred, metrics, tracker)
        if (note := constant_scores_warning(test_pred["score"].to_numpy(), "rank train")) is not None:
            print(note, file=sys.stderr)
    if ctx.owns_group:
        import torch.distributed as dist

        dist.destroy_process_group()
    return metrics
