"""The ranker side's config sections: `paths`, `data`, `ranker`, `train`, `lightgbm`.

Plain frozen dataclasses that import no torch (an architecture test checks
it), so a pipeline config is loaded and checked in full before any heavy
import. Each key is documented by its inline comment; `recsys config show`
prints them all as annotated YAML. The defaults ARE the frozen baseline
(experiments/configs/base.yaml is generated from them; a test checks that
they agree).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

from features import schemas as S
from features.core.config import expand_home, need

_INT32_MAX = 2**31 - 1

HistoryEncoder = Literal["mean", "reference", "svd_truncated", "svd_compact"]
DistilledMode = Literal["off", "init", "concat"]
OverArch = Literal["mlp", "dcn"]
LtTower = Literal["dense", "shared"]
SvdGramDtype = Literal["auto", "float64", "input"]  # = recsys.modules.svd_kernels.GRAM_DTYPES (tested)
Optimizer = Literal["adam", "adagrad", "sgd"]
Device = Literal["auto", "cpu", "cuda"]
HISTORY_ENCODERS: tuple[str, ...] = get_args(HistoryEncoder)
DISTILLED_MODES: tuple[str, ...] = get_args(DistilledMode)
OVER_ARCHS: tuple[str, ...] = get_args(OverArch)
LT_TOWERS: tuple[str, ...] = get_args(LtTower)
SVD_GRAM_DTYPES: tuple[str, ...] = get_args(SvdGramDtype)
OPTIMIZERS: tuple[str, ...] = get_args(Optimizer)
DEVICES: tuple[str, ...] = get_args(Device)
# old names refused with a pointer to the new one
RENAMED_HISTORY_ENCODERS = {"svd_exact": "svd_truncated"}


def _one_of(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


@dataclass(frozen=True)
class PathsConfig:
    """Where stages read and write (relative paths resolve against the working
    directory). Empty strings mean "derive from `root`"."""

    root: str = "artifacts/ml100k"  # working folder of a pipeline run
    features: str = ""  # default: {root}/features
    match_features: str = ""  # default: {root}/match (read only when data.use_match_features)
    embeddings: str = ""  # item embeddings parquet; default: {root}/distill/item_embeddings.parquet (a given file skips distillation)

    def __post_init__(self) -> None:
        expand_home(self, ("root", "features", "match_features", "embeddings"))
        if self.match_features.strip().lower() == "none":
            raise ValueError('match_features "none" is no longer a switch: set data.use_match_features: false')

    def resolve(self, name: Literal["features", "match_features", "embeddings"]) -> Path:
        """The configured path, or its default under `root`."""
        defaults = {"features": "features", "match_features": "match", "embeddings": "distill/item_embeddings.parquet"}
        value = getattr(self, name)
        return Path(value) if value else Path(self.root) / defaults[name]


@dataclass(frozen=True)
class DataConfig:
    """How the ranker's requests are built from a features folder (pipeline section `data`)."""

    history_cap: int = 1000  # keep the last this many events of a history (the features job's features.history_cap bounds it)
    use_match_features: bool = False  # read the mf_* match features (paths.match_features must then exist)
    match_columns: tuple[str, ...] = ()  # expected mf_* columns (empty: every mf_* column of the file)
    negatives_per_request: int = 0  # uniformly sampled negatives per training request

    def __post_init__(self) -> None:
        if not 1 <= self.history_cap <= _INT32_MAX:  # 2**63 crashed numpy's minimum with the lengths
            raise ValueError(f"history_cap must be in 1..{_INT32_MAX}, got {self.history_cap}")
        if self.negatives_per_request < 0:
            raise ValueError(f"negatives_per_request must be >= 0, got {self.negatives_per_request}")
        bad = [c for c in self.match_columns if not c.startswith(S.MATCH_PREFIX)]
        if bad:
            raise ValueError(f"match_columns must start with {S.MATCH_PREFIX!r}, got {bad[0]!r}")
        dups = sorted({c for c in self.match_columns if self.match_columns.count(c) > 1})
        if dups:
            raise ValueError(f"match_columns lists {dups} more than once")


@dataclass(frozen=True)
class RankerConfig:
    """Ranker architecture (pipeline section `ranker`).

    history_encoder "mean" is the masked mean of the history; "reference" is
    exact target attention; "svd_truncated" / "svd_compact" are the SVD-attention
    modes (recsys.modules.svd_attention; "svd_truncated", formerly "svd_exact",
    is target attention on the rank-R truncated history, exact only when a
    history's rank is <= svd_rank). With svd_gram_dtype "auto" the SVD
    encoders form the Gram in float64 while autograd is on (training) and in
    float32 under torch.no_grad (evaluation, serving); "input" trains on the
    float32 Gram too (faster, ~1e-7 relative error in G), "float64" evaluates
    on the float64 one. lt_tower "dense": the LT head has its own MLP over
    the dense features only (counts, recent activity, match features; no id
    embeddings): `returned_1d` is a property of the user-day, not the
    candidate, and the "shared" tower (the click over-arch output) can
    memorise train users. use_user_id is off by default: on a global time
    split most test users are unseen in train (README, "Choices").
    """

    embedding_dim: int = 16  # D of every table and of the history encoder
    history_encoder: HistoryEncoder = "mean"  # what each candidate sees of the history: a mean, exact target attention, or SVD-attention (class docstring)
    svd_rank: int = 8  # R of the SVD encoders (1 <= R <= embedding_dim)
    svd_normalize_tokens: bool = True  # compact: divide tokens by sqrt(L) so their scale does not grow with L
    svd_gram_dtype: SvdGramDtype = "auto"  # SVD encoders' Gram X^T X: auto = float64 in training, float32 under no_grad (evaluation, serving); input = float32 always (faster training); float64 = always
    history_mean: bool = False  # attention encoders also pass the mean pool's own block [mean, candidate * mean] to the over-arch
    use_user_id: bool = False  # a user-id table (see the class docstring for why it is off)
    use_distilled_embeddings: DistilledMode = "off"  # init: the item table starts as a PCA of the distilled vectors; concat: they are a frozen second item table (L2-normalised)
    over_arch: OverArch = "mlp"  # dcn: DCN-v2 full-rank cross layers before the MLP
    dcn_layers: int = 2  # cross layers for over_arch dcn
    dense_arch_layer_sizes: tuple[int, ...] = (16,)  # MLP over the dense features (last size = its output)
    over_arch_layer_sizes: tuple[int, ...] = (64, 32)  # MLP after the interaction (last size = H)
    click_weight: float = 1.0  # multi-task loss weight of the click head (> 0)
    lt_weight: float = 0.5  # multi-task loss weight of the LT-proxy head (returned_1d; > 0)
    lt_tower: LtTower = "dense"  # what the LT head sees (class docstring)
    init_std: float = 0.1  # std of the normal init of the embedding tables

    def __post_init__(self) -> None:
        if self.embedding_dim < 1:
            raise ValueError(f"embedding_dim must be >= 1, got {self.embedding_dim}")
        if self.history_encoder in RENAMED_HISTORY_ENCODERS:
            raise ValueError(
                f"history_encoder {self.history_encoder!r} was renamed "
                f"{RENAMED_HISTORY_ENCODERS[self.history_encoder]!r} (target attention on the rank-svd_rank "
                f"truncation of the history: exact only when the history's rank is <= svd_rank)"
            )
        _one_of("history_encoder", self.history_encoder, HISTORY_ENCODERS)
        # checked against embedding_dim only where an SVD encoder reads it: a mean arm of a smaller
        # embedding_dim must not need an svd_rank it never reads (a probe, 2026-12-01)
        if self.svd_rank < 1 or (self.history_encoder.startswith("svd") and self.svd_rank > self.embedding_dim):
            raise ValueError(f"svd_rank must satisfy 1 <= svd_rank <= embedding_dim={self.embedding_dim}, "
                             f"got {self.svd_rank}")
        _one_of("svd_gram_dtype", self.svd_gram_dtype, SVD_GRAM_DTYPES)
        _one_of("use_distilled_embeddings", self.use_distilled_embeddings, DISTILLED_MODES)
        _one_of("over_arch", self.over_arch, OVER_ARCHS)
        _one_of("lt_tower", self.lt_tower, LT_TOWERS)
        if self.dcn_layers < 1:
            raise ValueError(f"dcn_layers must be >= 1, got {self.dcn_layers}")
        for name in ("dense_arch_layer_sizes", "over_arch_layer_sizes"):
            sizes = getattr(self, name)
            if not sizes or any(s < 1 for s in sizes):
                raise ValueError(f"{name} must be a non-empty list of positive sizes, got {list(sizes)}")
        # a 0 weight leaves its head untrained, yet scored and reported
        need(self, ("click_weight", "lt_weight"), lambda v: v > 0,
             "> 0 (both heads are trained and evaluated: a head with weight 0 would report an untrained head's metrics)")
        if not self.init_std > 0:
            raise ValueError(f"init_std must be > 0, got {self.init_std}")


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
    patience: int = 2  # stop after this many epochs without a valid-GAUC gain > min_delta (valid AUC where GAUC is n/a, as under leave_last_out; 0: never)
    min_delta: float = 0.0  # smallest valid-GAUC gain that counts as better
    seed: int | None = None  # null: the pipeline's top-level seed
    checkpoint_dir: str = ""  # "": OUT/checkpoints
    resume: bool = True  # continue from checkpoint_dir/last.pt when its config matches and it has run at most `epochs` (else start fresh)
    device: Device = "auto"  # auto picks cuda when available
    progress: bool = True  # tqdm bars
    max_batches_per_epoch: int = 0  # 0: all (a positive value makes smoke runs)
    num_threads: int = 1  # torch intra-op threads while training (0: leave torch's setting)

    def checkpoints(self, out: str | Path) -> Path:
        """The folder of last.pt and best.pt: checkpoint_dir, or OUT/checkpoints."""
        return Path(self.checkpoint_dir) if self.checkpoint_dir else Path(out) / "checkpoints"

    def __post_init__(self) -> None:
        expand_home(self, ("checkpoint_dir",))
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        need(self, ("batch_size", "eval_batch_size"), lambda v: v >= 1, ">= 1")
        need(self, ("lr", "sparse_lr"), lambda v: v > 0, "> 0")
        _one_of("optimizer", self.optimizer, OPTIMIZERS)
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not 0 <= self.min_delta <= 1:
            raise ValueError(f"min_delta is a valid-GAUC gain: it must be in [0, 1], got {self.min_delta}")
        if self.patience < 0:
            raise ValueError(f"patience must be >= 0, got {self.patience}")
        _one_of("device", self.device, DEVICES)
        need(self, ("max_batches_per_epoch",), lambda v: v >= 0, ">= 0")
        if self.num_threads < 0:
            raise ValueError(f"num_threads must be >= 0, got {self.num_threads}")


ITEM_POS_RATE = "item_pos_rate"  # positives / events on the item strictly earlier (null: none yet)
USER_POS_RATE = "user_pos_rate"  # pos_hist_end / hist_end (null: no history)


@dataclass(frozen=True)
class LightGBMConfig:
    """LightGBM baseline settings (pipeline config section `lightgbm`)."""

    # "binary": click probability; "lambdarank": ranks each user's impressions
    # (score = sigmoid(raw), not calibrated: its logloss is not meaningful)
    objective: Literal["binary", "lambdarank"] = "binary"  # click model: binary log-loss, or lambdarank grouped by user (the LT model is always binary)
    num_leaves: int = 15  # leaves per tree (chosen on valid AUC)
    learning_rate: float = 0.05  # shrinkage per tree
    n_estimators: int = 1000  # upper bound; early stopping on valid picks the number
    early_stopping_rounds: int = 50  # stop when valid AUC (lambdarank: NDCG@10) has not improved for this many trees (a valid split with one label class: every tree is kept)
    min_child_samples: int = 100  # rows per leaf: ML-100K is small, keep leaves stable
    feature_fraction: float = 0.9  # share of features sampled per tree
    bagging_fraction: float = 0.8  # share of rows sampled per bagging round
    bagging_freq: int = 1  # re-sample rows every this many trees (0: no bagging)
    lambda_l2: float = 1.0  # L2 penalty on leaf values
    use_match_features: bool = True  # mf_* columns of the match-features folder (paths.match_features)
    use_popularity: bool = True  # item_pop
    use_activity: bool = True  # hist_end
    use_history_length: bool = True  # hist_len, pos_hist_len
    use_rates: bool = True  # item_pos_rate, user_pos_rate (add_rate_features)
    lt_model: bool = True  # train the LT-proxy model (returned_1d) for lt_score
    # one thread: the same trees on every machine, and on ML-100K-sized data
    # faster than an OpenMP pool (which stalls badly on a shared machine)
    num_threads: int = 1  # 0: LightGBM's default (all cores)
    seed: int | None = None  # null: the pipeline's top-level seed (the experiment runner sets it per seed)

    def __post_init__(self) -> None:
        need(self, ("num_leaves",), lambda v: v >= 2, ">= 2")
        need(self, ("learning_rate", "feature_fraction", "bagging_fraction"), lambda v: 0 < v <= 1, "in (0, 1]")
        need(self, ("n_estimators", "early_stopping_rounds", "min_child_samples"), lambda v: v >= 1, ">= 1")
        need(self, ("bagging_freq", "lambda_l2", "num_threads"), lambda v: v >= 0, ">= 0")
        # LightGBM reads these as C ints: 2**32 + 5 rows per leaf became 5, 2**31 leaves "not > 1"
        need(self, ("num_leaves", "n_estimators", "early_stopping_rounds", "min_child_samples", "bagging_freq",
                    "num_threads"), lambda v: v <= _INT32_MAX, f"<= {_INT32_MAX}")

    def base_features(self) -> list[str]:
        """The interactions columns this config uses."""
        cols = []
        if self.use_popularity:
            cols.append(S.ITEM_POP)
        if self.use_activity:
            cols.append(S.HIST_END)
        if self.use_history_length:
            cols += [S.HIST_LEN, S.POS_HIST_LEN]
        if self.use_rates:
            cols += [ITEM_POS_RATE, USER_POS_RATE]
        return cols


__all__ = [
    "PathsConfig", "DataConfig", "RankerConfig", "TrainConfig", "LightGBMConfig",
    "HISTORY_ENCODERS", "DISTILLED_MODES", "OVER_ARCHS", "LT_TOWERS", "OPTIMIZERS", "DEVICES",
    "RENAMED_HISTORY_ENCODERS", "ITEM_POS_RATE", "USER_POS_RATE",
]
