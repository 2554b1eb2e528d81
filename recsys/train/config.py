"""`TrainConfig`, the pipeline section `train` (imports no torch)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

Optimizer = Literal["adam", "adagrad", "sgd"]
Device = Literal["auto", "cpu", "cuda"]
OPTIMIZERS: tuple[str, ...] = get_args(Optimizer)
DEVICES: tuple[str, ...] = get_args(Device)


@dataclass(frozen=True)
class TrainConfig:
    """Training loop (pipeline section `train`).

    num_threads: the ranker's ops are small and thread hand-off dominates, so
    one thread is the default; the previous setting is restored when training
    returns.
    """

    epochs: int = 6  # maximum epochs
    batch_size: int = 256  # requests per optimiser step (all ranks together)
    eval_batch_size: int = 2048  # requests per evaluation batch
    lr: float = 0.003  # learning rate of the dense part
    optimizer: Optimizer = "adam"  # dense part
    weight_decay: float = 0.0  # dense part
    sparse_lr: float = 0.05  # row-wise Adagrad learning rate of the embedding tables
    patience: int = 2  # stop after this many epochs without a valid-GAUC gain > min_delta (0: never)
    min_delta: float = 0.0  # smallest valid-GAUC gain that counts as better
    negatives_per_request: int = 0  # uniformly sampled negatives per training request
    seed: int | None = None  # null: the pipeline's top-level seed
    checkpoint_dir: str = ""  # "": OUT/checkpoints
    resume: bool = True  # continue from checkpoint_dir/last.pt when its config matches
    device: Device = "auto"  # auto picks cuda when available
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
