"""Train and evaluate the ranker: one process, or DistributedModelParallel under torchrun.

    train_ranker(cfg, out_dir, tracker) -> metrics dict
        cfg: a PipelineConfig (or anything with .paths, .ranker, .train, .seed)
        writes out_dir/metrics.json and out_dir/predictions.parquet (rank 0)

Loop: epochs over shuffled training requests (tqdm bar on rank 0), the valid
split evaluated after every epoch, early stopping on valid GAUC (patience in
epochs), the best epoch's weights evaluated on test. Sparse tables learn with
row-wise Adagrad (`sparse_lr`), the dense part with `optimizer` (`lr`).

Determinism: weights come from a torch.Generator seeded with the seed, the
shuffle of epoch e from np.random.default_rng([seed, e]) and sampled
negatives from default_rng([seed, e, 1, rank]); nothing reads a global RNG,
so the same seed gives the same metrics, and a run resumed from the
checkpoint of epoch e continues exactly like an uninterrupted one.

Honest failure: a NaN or inf loss or dense gradient (checked after each
backward, before the optimiser step) or score (every evaluation) stops the run
with `TrainingDiverged` (exit 1) naming the epoch and step. A metric that
cannot be computed (no rows, one class, no observed LT rows) is NaN, written
as null in metrics.json with its reason under "reasons", printed as n/a.
Train, valid and test must all have rows, and train both click labels.

Checkpoints (`checkpoint_dir`, default out_dir/checkpoints): `last.pt` after
every finished epoch (model, optimisers, epoch, early-stopping state) and
`best.pt` (model weights of the best epoch); state dicts only, read back with
torch.load(weights_only=True); a file that cannot be read is a DataError
suggesting --no-resume. Under DMP every rank writes its own
`*.rank{r}of{w}.pt` holding its local shards.

Distributed: when WORLD_SIZE > 1 (torchrun) or a process group is already
initialised, the train module is wrapped in torchrec's
DistributedModelParallel: gloo on CPU (nccl with CUDA), tables sharded by
EmbeddingShardingPlanner on a Topology of this device, restricted to the
sharding types that work on CPU (item table: table/row/column-wise; pooled
tables: table/column/table-column-wise; fused kernel). The initial weights are
those of the single-process model with the same seed (copied into the local
shards). Each rank reads `batch_size // world_size` requests of every step
(interleaved shares of the same permutation); predictions are gathered and
de-duplicated so metrics are over every impression once, on every rank.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from torch import Tensor, nn

from features import schemas as S
from features.core.config import config_hash, flatten, to_dict
from features.core.errors import DataError, TrainingDiverged, UsageError
from features.core.tracker import NullTracker, Tracker
from recsys.data import DataConfig, RankingData, resolve_match_path
from recsys.eval.metrics import (
    METRICS,
    activity_bucket,
    auc,
    auc_by_bucket,
    format_metric,
    gauc,
    logloss,
    nan_reason,
    spearman,
)
from recsys.models.ranker import Ranker, RankerConfig, RankerTrain, probabilities
from recsys.modules.svd_attention import SVDFactorizationError

OPTIMIZERS = ("adam", "adagrad", "sgd")
DEVICES = ("auto", "cpu", "cuda")
EARLY_STOP_METRIC = "gauc"
PREDICTION_COLUMNS = (
    S.USER_ID, S.ITEM_ID, S.TIMESTAMP, S.LABEL, "score", "lt_score",
    S.RETURNED_1D, S.ACTIVE_DAYS_7, S.LT_OBSERVED, S.HIST_LEN,
)
# keys that do not change what a run computes: a resume may differ in them
_RESUME_FREE = ("epochs", "resume", "progress", "checkpoint_dir", "device", "eval_batch_size", "num_threads")
CONTRACT_METRICS = ("auc", "gauc", "logloss", "lt_auc", "lt_spearman")


@dataclass(frozen=True)
class TrainConfig:
    """Training loop (pipeline section `train`).

    num_threads: the ranker's ops are small: on this 2-core CPU one thread was
    >10x faster than two under load (thread hand-off dominates); the previous
    setting is restored when training returns.
    """

    epochs: int = 6  # maximum epochs
    batch_size: int = 256  # requests per optimiser step (all ranks together)
    eval_batch_size: int = 2048  # requests per evaluation batch
    lr: float = 0.003  # learning rate of the dense part
    optimizer: str = "adam"  # adam | adagrad | sgd (dense part)
    weight_decay: float = 0.0  # dense part
    sparse_lr: float = 0.05  # row-wise Adagrad learning rate of the embedding tables
    patience: int = 2  # stop after this many epochs without a valid-GAUC gain > min_delta (0: never)
    min_delta: float = 0.0  # smallest valid-GAUC gain that counts as better
    negatives_per_request: int = 0  # uniformly sampled negatives per training request
    seed: int | None = None  # null: the pipeline's top-level seed
    checkpoint_dir: str = ""  # "": OUT/checkpoints
    resume: bool = True  # continue from checkpoint_dir/last.pt when its config matches
    device: str = "auto"  # auto (cuda when available) | cpu | cuda
    progress: bool = True  # tqdm bars
    max_batches_per_epoch: int = 0  # 0: all (a positive value makes smoke runs)
    num_threads: int = 1  # torch intra-op threads while training (0: leave torch's setting)

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1 or self.eval_batch_size < 1:
            raise ValueError("batch_size and eval_batch_size must be >= 1")
        if not (self.lr > 0 and self.sparse_lr > 0):
            raise ValueError("lr and sparse_lr must be > 0")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not 0 <= self.min_delta <= 1:
            raise ValueError(f"min_delta is a valid-GAUC gain: it must be in [0, 1], got {self.min_delta}")
        if self.patience < 0:
            raise ValueError(f"patience must be >= 0, got {self.patience}")
        if self.negatives_per_request < 0:
            raise ValueError(f"negatives_per_request must be >= 0, got {self.negatives_per_request}")
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {self.device!r}")
        if self.max_batches_per_epoch < 0:
            raise ValueError("max_batches_per_epoch must be >= 0")
        if self.num_threads < 0:
            raise ValueError(f"num_threads must be >= 0, got {self.num_threads}")


# --- metrics ---------------------------------------------------------------------------


def evaluate_predictions(frame: pl.DataFrame) -> dict[str, Any]:
    """Metrics of a predictions table (PREDICTION_COLUMNS): click AUC, GAUC
    (user-grouped, impression-weighted), logloss, LT AUC on `returned_1d` and
    LT Spearman with `active_days_7` (both over lt_observed rows), and AUC per
    user-activity bucket of hist_len.

    A metric that cannot be computed is NaN, and `reasons[name]` says why
    (e.g. "no observed LT rows")."""
    y = frame[S.LABEL].to_numpy().astype(np.float64)
    s = frame["score"].to_numpy()
    users = frame[S.USER_ID].to_numpy()
    obs = frame[S.LT_OBSERVED].to_numpy().astype(bool)
    lt = frame["lt_score"].to_numpy()[obs]
    returned, active = frame[S.RETURNED_1D].to_numpy()[obs], frame[S.ACTIVE_DAYS_7].to_numpy()[obs]
    out: dict[str, Any] = {
        "auc": auc(y, s),
        "gauc": gauc(users, y, s),
        "logloss": logloss(y, s),
        "lt_auc": auc(returned, lt),
        "lt_spearman": spearman(lt, active),
        "n": int(frame.height),
    }
    truth = {"auc": (y, s, S.LABEL), "gauc": (y, s, S.LABEL), "logloss": (y, s, S.LABEL),
             "lt_auc": (returned, lt, S.RETURNED_1D), "lt_spearman": (active, lt, S.ACTIVE_DAYS_7)}
    reasons = {}
    for name, (t, score, label) in truth.items():
        if np.isfinite(out[name]):
            continue
        if name.startswith("lt_") and frame.height and not obs.any():
            reasons[name] = f"no observed LT rows ({S.LT_OBSERVED} is false on all {frame.height} rows)"
        else:
            reasons[name] = nan_reason(METRICS[name].kind, t, score, label)
    out["reasons"] = reasons
    out["auc_by_activity"] = auc_by_bucket(activity_bucket(frame[S.HIST_LEN].to_numpy()), y, s)
    return out


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


def _finite(d: Any) -> Any:
    """JSON-safe: NaN and inf -> None (recursively, through mappings and lists)."""
    if isinstance(d, Mapping):
        return {k: _finite(v) for k, v in d.items()}
    if isinstance(d, (list, tuple)):
        return [_finite(v) for v in d]
    if isinstance(d, (float, np.floating)) and not np.isfinite(d):
        return None
    return d


# --- process context -----------------------------------------------------------------


@dataclass
class _Context:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def check_launch_env(environ: Mapping[str, str] | None = None) -> int:
    """The world size torchrun asked for (1 without torchrun). WORLD_SIZE or
    RANK set by hand, without the rest of the rendezvous (MASTER_ADDR,
    MASTER_PORT), is a UsageError at once, not a hang or a traceback in
    init_process_group."""
    env = os.environ if environ is None else environ
    given = {k: env[k] for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK") if env.get(k, "").strip()}
    if not given:
        return 1
    fix = ("launch with `torchrun --nproc_per_node=N -m recsys.cli.rank train ...`, "
           "or unset WORLD_SIZE, RANK and LOCAL_RANK for one process")
    values = {}
    for k, v in given.items():
        try:
            values[k] = int(v)
        except ValueError:
            raise UsageError(f"environment variable {k}={v!r} is not an integer: {fix}") from None
    world, rank = values.get("WORLD_SIZE", 1), values.get("RANK", 0)
    if world < 1:
        raise UsageError(f"environment variable WORLD_SIZE={world} must be >= 1: {fix}")
    if not 0 <= rank < world:
        raise UsageError(f"environment variable RANK={rank} is outside [0, WORLD_SIZE={world}): {fix}")
    if world > 1:
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT", "RANK") if not env.get(k, "").strip()]
        if missing:
            verb = "is" if len(missing) == 1 else "are"
            raise UsageError(f"WORLD_SIZE={world} is set but {', '.join(missing)} {verb} not "
                             f"(no torchrun rendezvous): {fix}")
    return world


def _context(cfg: TrainConfig) -> _Context:
    import torch.distributed as dist

    cuda = torch.cuda.is_available() and cfg.device in ("auto", "cuda")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        from features.core.errors import ConfigError

        raise ConfigError("train.device is 'cuda' but no CUDA device is available")
    world = check_launch_env()
    owns = False
    if not dist.is_initialized() and world > 1:
        dist.init_process_group(backend="nccl" if cuda else "gloo")
        owns = True
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = 0, 1
    local = int(os.environ.get("LOCAL_RANK", rank))
    device = torch.device(f"cuda:{local}" if world > 1 else "cuda") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    return _Context(rank, world, device, owns)


# --- model, sharding, optimisers -------------------------------------------------------


def _dense_optimizer(cfg: TrainConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adagrad":
        return torch.optim.Adagrad(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


@dataclass
class _Trainable:
    module: nn.Module  # RankerTrain, or DMP around it
    dense_opt: torch.optim.Optimizer
    sparse_opt: Any  # RowWiseAdagrad (one process) or DMP's fused optimizer
    sharding: dict[str, str] = dataclasses.field(default_factory=dict)  # table -> "type on ranks" (DMP)


def _sharding_constraints(model: Ranker) -> dict[str, Any]:
    from torchrec.distributed.embedding_types import EmbeddingComputeKernel
    from torchrec.distributed.planner.types import ParameterConstraints
    from torchrec.distributed.types import ShardingType

    fused = [EmbeddingComputeKernel.FUSED.value]
    # CPU: row-wise works for EmbeddingCollection only; EmbeddingBagCollection row-wise fails
    seq_types = [ShardingType.TABLE_WISE.value, ShardingType.ROW_WISE.value, ShardingType.COLUMN_WISE.value]
    bag_types = [ShardingType.TABLE_WISE.value, ShardingType.COLUMN_WISE.value, ShardingType.TABLE_COLUMN_WISE.value]
    out = {"item": ParameterConstraints(sharding_types=seq_types, compute_kernels=fused)}
    for key in model.user_keys + model.item_keys:
        out[key] = ParameterConstraints(sharding_types=bag_types, compute_kernels=fused)
    return out


def _copy_full_into_shards(module: nn.Module, full: Mapping[str, Tensor]) -> None:
    """Copy full (unsharded) tensors into a DMP module's local shards and replicas."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    with torch.no_grad():
        for name, live in module.state_dict().items():
            src = full[name]
            if isinstance(live, ShardedTensor):
                for shard in live.local_shards():
                    idx = tuple(slice(o, o + s) for o, s in zip(shard.metadata.shard_offsets, shard.metadata.shard_sizes))
                    shard.tensor.copy_(src[idx])
            elif isinstance(live, Tensor):
                live.copy_(src)


def _build(model: Ranker, cfg: TrainConfig, ctx: _Context) -> _Trainable:
    train_module = RankerTrain(model)
    if not ctx.distributed:
        train_module = train_module.to(ctx.device)
        tables = {id(p) for p in model.embedding_tables()}
        dense = [p for p in train_module.parameters() if id(p) not in tables and p.requires_grad]
        from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

        return _Trainable(train_module, _dense_optimizer(cfg, dense), RowWiseAdagrad(model.embedding_tables(), lr=cfg.sparse_lr))

    import torch.distributed as dist
    from torch.distributed.optim import _apply_optimizer_in_backward
    from torchrec.distributed import DistributedModelParallel
    from torchrec.distributed.embedding import EmbeddingCollectionSharder
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
    from torchrec.optim.optimizers import in_backward_optimizer_filter
    from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

    full = {k: v.detach().clone() for k, v in train_module.state_dict().items()}
    _apply_optimizer_in_backward(RowWiseAdagrad, model.embedding_tables(), {"lr": cfg.sparse_lr})
    sharders = [EmbeddingCollectionSharder(), EmbeddingBagCollectionSharder()]
    planner = EmbeddingShardingPlanner(
        topology=Topology(world_size=ctx.world_size, compute_device=ctx.device.type),
        constraints=_sharding_constraints(model),
    )
    plan = planner.collective_plan(train_module, sharders, dist.GroupMember.WORLD)
    dmp = DistributedModelParallel(train_module, device=ctx.device, plan=plan, sharders=sharders)
    _copy_full_into_shards(dmp, full)
    dense = [p for _, p in in_backward_optimizer_filter(dmp.named_parameters()) if p.requires_grad]
    sharding = {
        table: f"{ps.sharding_type} on ranks {ps.ranks}"
        for module_plan in plan.plan.values()
        for table, ps in module_plan.items()
    }
    return _Trainable(dmp, _dense_optimizer(cfg, dense), dmp.fused_optimizer, sharding)


# --- checkpoints -----------------------------------------------------------------------


def _local(obj: Any) -> Any:
    """State (nested dicts/lists) with ShardedTensors replaced by their local shards."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    if isinstance(obj, ShardedTensor):
        return {"__local_shards__": [s.tensor.detach().clone() for s in obj.local_shards()]}
    if isinstance(obj, Tensor):
        return obj.detach().clone()
    if isinstance(obj, Mapping):
        return {k: _local(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_local(v) for v in obj)
    return obj


def _copy_local(live: Any, saved: Any) -> None:
    """In-place copy of a `_local` state into live state tensors (same structure)."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    if isinstance(live, ShardedTensor):
        for shard, src in zip(live.local_shards(), saved["__local_shards__"], strict=True):
            shard.tensor.copy_(src)
    elif isinstance(live, Tensor):
        live.copy_(saved)
    elif isinstance(live, Mapping):
        for k, v in live.items():
            _copy_local(v, saved[k])
    elif isinstance(live, (list, tuple)):
        for a, b in zip(live, saved, strict=True):
            _copy_local(a, b)


def _model_state(tr: _Trainable) -> dict[str, Any]:
    return _local(tr.module.state_dict())


def _load_model_state(tr: _Trainable, state: Mapping[str, Any]) -> None:
    with torch.no_grad():
        _copy_local(tr.module.state_dict(), state)


def _save(path: Path, payload: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(dict(payload), tmp)
    tmp.replace(path)


def _load(path: Path) -> dict[str, Any]:
    """A checkpoint written by `_save`; a file that is not one is a DataError
    (exit 1) suggesting --no-resume, not a pickle traceback."""
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises several types for a broken file
        detail = str(e).strip().splitlines()[0] if str(e).strip() else "no detail"
        raise _bad_checkpoint(path, f"cannot be read ({type(e).__name__}: {detail})") from e
    if not isinstance(ck, dict) or "model" not in ck:
        raise _bad_checkpoint(path, "is not a checkpoint of this trainer")
    return ck


def _bad_checkpoint(path: Path, what: str) -> DataError:
    return DataError(f"checkpoint {what}: rerun with --no-resume (or delete it) to train from scratch", file=str(path))


def _ckpt_name(stem: str, ctx: _Context) -> str:
    return f"{stem}.pt" if not ctx.distributed else f"{stem}.rank{ctx.rank}of{ctx.world_size}.pt"


# --- epochs ----------------------------------------------------------------------------


def _progress(it: Iterator, total: int, desc: str, enabled: bool) -> Iterator:
    from tqdm import tqdm

    return tqdm(it, total=total, desc=desc, disable=None if enabled else True, leave=False, file=sys.stderr, mininterval=1.0)


def _train_epoch(tr: _Trainable, data: RankingData, cfg: TrainConfig, seed: int, epoch: int, ctx: _Context) -> dict[str, float]:
    tr.module.train()
    shuffle = np.random.default_rng([seed, epoch])
    negatives = np.random.default_rng([seed, epoch, 1, ctx.rank]) if cfg.negatives_per_request else None
    total = data.n_batches("train", cfg.batch_size, ctx.world_size)
    if cfg.max_batches_per_epoch:
        total = min(total, cfg.max_batches_per_epoch)
    batches = data.iter_batches("train", cfg.batch_size, shuffle=shuffle, negatives=negatives, rank=ctx.rank,
                                world_size=ctx.world_size, max_batches=cfg.max_batches_per_epoch)
    sums = np.zeros(3)
    n = 0
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
        if n % 20 == 0:
            bar.set_postfix(loss=f"{sums[0] / n:.4f}")
    if ctx.distributed:
        import torch.distributed as dist

        t = torch.tensor([*sums, n], dtype=torch.float64)
        dist.all_reduce(t)
        sums, n = t[:3].numpy(), int(t[3])
    n = max(n, 1)
    return {"train_loss": sums[0] / n, "train_click_loss": sums[1] / n, "train_lt_loss": sums[2] / n}


def _check_step(tr: _Trainable, loss: Tensor, where: str, ctx: _Context, cfg: TrainConfig) -> None:
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


@torch.no_grad()
def predict(tr_module: nn.Module, data: RankingData, split: str, batch_size: int, ctx: _Context | None = None) -> pl.DataFrame:
    """Predictions table (PREDICTION_COLUMNS) of every impression of a split,
    in interactions.parquet order (sampled negatives never included)."""
    ctx = ctx or _Context()
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


# --- the training run ------------------------------------------------------------------


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
                        "(check the label threshold of `recsys features build`)", file=file, column=S.LABEL)


def _better(new: float, best: float | None, min_delta: float) -> bool:
    if best is None:
        return bool(np.isfinite(new))
    if not np.isfinite(new):
        return False
    sign = 1.0 if METRICS[EARLY_STOP_METRIC].higher_is_better else -1.0
    return sign * (new - best) > min_delta


def _resume_key(ranker: RankerConfig, train: TrainConfig, seed: int, data: RankingData, world: int) -> str:
    t = {k: v for k, v in to_dict(train).items() if k not in _RESUME_FREE}
    return config_hash({"ranker": to_dict(ranker), "train": t, "seed": seed, "spec": to_dict(data.spec), "world": world})


def fit(
    data: RankingData,
    ranker: RankerConfig,
    train: TrainConfig,
    out_dir: str | Path,
    tracker: Tracker | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Train on `data`, evaluate valid every epoch and test at the end; write
    metrics.json and predictions.parquet into out_dir (rank 0); return metrics."""
    threads = torch.get_num_threads()
    if train.num_threads:
        torch.set_num_threads(train.num_threads)
    try:
        return _fit(data, ranker, train, out_dir, tracker, seed)
    finally:
        torch.set_num_threads(threads)


def _fit(
    data: RankingData,
    ranker: RankerConfig,
    train: TrainConfig,
    out_dir: str | Path,
    tracker: Tracker | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    t_start = time.perf_counter()
    tracker = tracker or NullTracker()
    _check_splits(data)
    ctx = _context(train)
    out = Path(out_dir)
    ckpt_dir = Path(train.checkpoint_dir) if train.checkpoint_dir else out / "checkpoints"
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        tracker.log_params(flatten({"ranker": to_dict(ranker), "train": to_dict(train), "seed": seed}))
    generator = torch.Generator().manual_seed(seed)
    model = Ranker(ranker, data.spec, data.item_embeddings, generator)
    tr = _build(model, train, ctx)
    key = _resume_key(ranker, train, seed, data, ctx.world_size)

    state = {"epoch": 0, "best": None, "best_epoch": -1, "bad_epochs": 0, "stopped": False, "history": [],
             "train_seconds": 0.0}
    last_path, best_path = ckpt_dir / _ckpt_name("last", ctx), ckpt_dir / _ckpt_name("best", ctx)
    ck = _load(last_path) if train.resume and last_path.exists() else None
    if ck is not None and ck.get("key") != key:
        print(f"checkpoint {last_path} is from another config; starting fresh", file=sys.stderr)
        ck = None
    if ck is None:
        best_path.unlink(missing_ok=True)  # never evaluate a stale best from an earlier run
    else:
        try:
            _load_model_state(tr, ck["model"])
            tr.dense_opt.load_state_dict(ck["dense_opt"])
            if ctx.distributed:
                _copy_local(tr.sparse_opt.state_dict(), ck["sparse_opt"])
            else:
                tr.sparse_opt.load_state_dict(ck["sparse_opt"])
            state = json.loads(ck["state"])
        except (KeyError, ValueError, TypeError, RuntimeError) as e:
            raise _bad_checkpoint(last_path, f"does not match this model ({type(e).__name__})") from e
        if ctx.is_main:
            print(f"resumed from {last_path} after epoch {state['epoch']}", file=sys.stderr)

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
        score = valid[EARLY_STOP_METRIC]
        if _better(score, state["best"], train.min_delta):
            state.update(best=float(score), best_epoch=epoch + 1, bad_epochs=0)
            _save(best_path, {"model": _model_state(tr), "epoch": epoch + 1})
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
        _save(last_path, {
            "key": key,
            "model": _model_state(tr),
            "dense_opt": tr.dense_opt.state_dict(),
            "sparse_opt": _local(tr.sparse_opt.state_dict()),
            "state": json.dumps(state),
        })

    if best_path.exists():
        try:
            _load_model_state(tr, _load(best_path)["model"])
        except (KeyError, ValueError, TypeError, RuntimeError) as e:
            raise _bad_checkpoint(best_path, f"does not match this model ({type(e).__name__})") from e
    valid_pred = predict(tr.module, data, "valid", train.eval_batch_size, ctx)
    test_pred = predict(tr.module, data, "test", train.eval_batch_size, ctx)
    valid = evaluate_predictions(valid_pred)
    test = evaluate_predictions(test_pred)
    metrics: dict[str, Any] = {k: test[k] for k in CONTRACT_METRICS}
    metrics.update(
        reasons=test["reasons"],
        n_test=test["n"],
        auc_by_activity=test["auc_by_activity"],
        valid={k: v for k, v in valid.items() if k != "n"},
        best_epoch=state["best_epoch"],
        epochs_run=state["epoch"],
        stopped_early=state["stopped"],
        history=state["history"],
        train_seconds=state["train_seconds"],
        seconds=time.perf_counter() - t_start,
        history_encoder=ranker.history_encoder,
        world_size=ctx.world_size,
        sharding=tr.sharding,
        seed=seed,
        match_features=list(data.match_columns),
        config_hash=key,
    )
    if ctx.is_main:
        # both files written beside their final names first: a failure leaves
        # the previous pair (or none), never a new predictions file with old metrics
        pred_path, metrics_path = out / "predictions.parquet", out / "metrics.json"
        tmp_pred, tmp_metrics = pred_path.with_suffix(".parquet.tmp"), metrics_path.with_suffix(".json.tmp")
        test_pred.write_parquet(tmp_pred)
        tmp_metrics.write_text(json.dumps(_finite(metrics), indent=2, allow_nan=False) + "\n")
        tmp_pred.replace(pred_path)
        tmp_metrics.replace(metrics_path)
        tracker.log_metrics({f"test_{k}": float(metrics[k]) for k in CONTRACT_METRICS
                             if metrics[k] is not None and np.isfinite(metrics[k])})
        tracker.log_artifact(metrics_path)
        tracker.log_artifact(pred_path)
    if ctx.owns_group:
        import torch.distributed as dist

        dist.destroy_process_group()
    return metrics


def data_config(ranker: RankerConfig, train: TrainConfig) -> DataConfig:
    return DataConfig(max_history=ranker.max_history, negatives=train.negatives_per_request,
                      use_match_features=ranker.use_match_features, match_columns=ranker.match_columns)


def ranker_inputs(cfg: Any) -> dict[str, Path | None]:
    """The files a ranker run reads, keyed by their config key (None: not
    used): paths.features, paths.match_features (the parquet file, when
    ranker.use_match_features and the path is not "none") and paths.embeddings
    (when ranker.use_distilled_embeddings != "off"). A requested match or
    embeddings file that is absent is a UsageError (exit 2), never a quiet run
    without it. The CLI checks --out against these before any work."""
    ranker: RankerConfig = cfg.ranker
    paths = cfg.paths
    match = None
    if ranker.use_match_features and paths.match_features.strip().lower() != "none":
        match = resolve_match_path(paths.resolve("match_features"), key="paths.match_features")
    embeddings = None
    if ranker.use_distilled_embeddings != "off":
        embeddings = paths.resolve("embeddings")
        if not embeddings.is_file():
            raise UsageError(f"paths.embeddings: {embeddings} does not exist (ranker.use_distilled_embeddings is "
                             f"{ranker.use_distilled_embeddings!r}); run `recsys distill train` or set it to off")
    return {"paths.features": paths.resolve("features"), "paths.match_features": match, "paths.embeddings": embeddings}


def train_ranker(cfg: Any, out_dir: str | Path, tracker: Tracker | None = None) -> dict[str, Any]:
    """Load the data named by cfg.paths and `fit` (see module docstring).

    cfg: PipelineConfig-like (.paths: PathsConfig, .ranker, .train, .seed).
    Inputs as in `ranker_inputs`: paths.match_features "none" is the one way
    to run without match features while ranker.use_match_features is true.
    """
    ranker: RankerConfig = cfg.ranker
    train: TrainConfig = cfg.train
    seed = train.seed if train.seed is not None else int(getattr(cfg, "seed", 0))
    inputs = ranker_inputs(cfg)
    data = RankingData.load(inputs["paths.features"], data_config(ranker, train), inputs["paths.match_features"],
                            inputs["paths.embeddings"])
    return fit(data, ranker, train, out_dir, tracker, seed=seed)


__all__ = [
    "TrainConfig",
    "TrainingDiverged",
    "check_launch_env",
    "data_config",
    "evaluate_predictions",
    "fit",
    "metrics_line",
    "predict",
    "ranker_inputs",
    "train_ranker",
]