"""The worker's process group, and the ranker wrapped for training: one
process, or DistributedModelParallel with its sharding plan.

When WORLD_SIZE > 1 (torchrun) or a process group is already initialised,
the train module is wrapped in torchrec's DistributedModelParallel: gloo on
CPU (nccl with CUDA), tables sharded by EmbeddingShardingPlanner on a
Topology of this device, restricted to the sharding types that work on CPU
(item table: table/row/column-wise; pooled tables: table/column/table-column-wise;
fused kernel). The initial weights are those of the single-process model
with the same seed (copied into the local shards).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from features.core.errors import ConfigError, UsageError
from recsys.models.ranker import Ranker, RankerTrain
from recsys.config.sections import TrainConfig


@dataclass
class WorkerContext:
    """This process's place in the process group, and the device it trains on."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # this process initialised the group, so it destroys it

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


def worker_context(cfg: TrainConfig) -> WorkerContext:
    """Join (or start, under torchrun) the process group and pick the device."""
    import torch.distributed as dist

    cuda = torch.cuda.is_available() and cfg.device in ("auto", "cuda")
    if cfg.device == "cuda" and not torch.cuda.is_available():
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
    return WorkerContext(rank, world, device, owns)


def _dense_optimizer(cfg: TrainConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adagrad":
        return torch.optim.Adagrad(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


@dataclass
class Trainable:
    """The module the loop steps, with its two optimisers."""

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


def build_trainable(model: Ranker, cfg: TrainConfig, ctx: WorkerContext) -> Trainable:
    """RankerTrain with row-wise Adagrad on the tables and `cfg.optimizer` on
    the rest; under a process group, sharded by DMP (fused sparse optimiser)."""
    train_module = RankerTrain(model)
    if not ctx.distributed:
        train_module = train_module.to(ctx.device)
        tables = {id(p) for p in model.embedding_tables()}
        dense = [p for p in train_module.parameters() if id(p) not in tables and p.requires_grad]
        from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

        return Trainable(train_module, _dense_optimizer(cfg, dense), RowWiseAdagrad(model.embedding_tables(), lr=cfg.sparse_lr))

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
    return Trainable(dmp, _dense_optimizer(cfg, dense), dmp.fused_optimizer, sharding)
