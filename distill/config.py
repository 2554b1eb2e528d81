"""The distill stage's config sections: `teachers` and `distill`.

Plain frozen dataclasses that import no torch, so the pipeline config can be
loaded and checked before any heavy import. Every key is documented by its
inline comment (`recsys config show` prints them as annotated YAML).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from features.core.config import expand_home, need

LOSSES = ("s2i", "id2i", "i2i")  # the student's losses, each with a use_* switch
TEACHER_NAMES = ("id2item", "seq2item")


@dataclass(frozen=True)
class ID2ItemConfig:
    """Section `teachers.id2item`."""

    dim: int = 64  # user and item embedding size
    loss: Literal["bpr", "sampled_softmax"] = "sampled_softmax"  # ML-100K valid R@50: 0.508 vs bpr 0.501
    num_negatives: int = 256  # sampled softmax: shared uniform negatives per batch
    epochs: int = 30  # at most; early stopping on valid warm Recall@select_k
    patience: int = 2  # epochs without a better valid score before stopping (0: never stop early)
    lr: float = 0.01  # Adam learning rate
    l2: float = 1e-5  # penalty on the embedding rows used in a batch
    batch_size: int = 1024  # (user, positive item) pairs per step
    init_std: float = 0.05  # std of the normal initial table rows

    def __post_init__(self) -> None:
        need(self, ("dim", "epochs", "batch_size", "num_negatives"), lambda v: v >= 1, ">= 1")
        need(self, ("lr", "init_std"), lambda v: v > 0, "> 0")
        need(self, ("l2", "patience"), lambda v: v >= 0, ">= 0")


@dataclass(frozen=True)
class Seq2ItemConfig:
    """Section `teachers.seq2item`."""

    encoder: Literal["mean", "transformer"] = "mean"  # chosen on valid (ML-100K: mean 0.47 vs transformer 0.41 R@50, 4x cheaper)
    dim: int = 64  # item and state size
    n_layers: int = 3  # transformer blocks
    n_heads: int = 2  # transformer attention heads (dim must be divisible)
    max_len: int = 20  # most recent positives the encoder sees
    dropout: float = 0.2  # on embeddings and inside the transformer blocks
    num_negatives: int = 256  # shared uniform negatives per batch (>= known items: full softmax)
    epochs: int = 30  # at most; early stopping on valid warm Recall@select_k
    patience: int = 2  # epochs without a better valid score before stopping (0: never)
    lr: float = 1e-2  # Adam learning rate
    init_std: float = 0.05  # item tables
    batch_size: int = 128  # windows per batch
    tie_weights: bool = False  # share input and output item tables

    def __post_init__(self) -> None:
        need(self, ("dim", "n_layers", "n_heads", "max_len", "num_negatives", "epochs", "batch_size"), lambda v: v >= 1, ">= 1")
        if self.encoder == "transformer" and self.dim % self.n_heads:  # the mean encoder has no heads
            raise ValueError(f"seq2item: dim {self.dim} must be divisible by n_heads {self.n_heads}")
        need(self, ("dropout",), lambda v: 0 <= v < 1, "in [0, 1)")
        need(self, ("lr", "init_std"), lambda v: v > 0, "> 0")
        need(self, ("patience",), lambda v: v >= 0, ">= 0")


@dataclass(frozen=True)
class TeachersConfig:
    """Pipeline section `teachers` (every key documented on its dataclass)."""

    id2item: ID2ItemConfig = field(default_factory=ID2ItemConfig)  # ID-to-item teacher (TorchRec MF)
    seq2item: Seq2ItemConfig = field(default_factory=Seq2ItemConfig)  # sequence-to-item teacher
    seed: int | None = None  # None: the pipeline's `seed` (0 when called as a library)

    def __post_init__(self) -> None:
        if self.seed is not None and self.seed < 0:
            raise ValueError("teachers: seed must be >= 0")


@dataclass(frozen=True)
class StudentConfig:
    """Student architecture (section `distill.student`)."""

    dim: int = 64  # D: item embedding size
    hidden_dim: int = 128  # H: per-modality width before fusion
    field_dim: int = 32  # size of a field value's embedding
    dropout: float = 0.1  # inside the per-modality MLPs
    # Training-time regularisers against memorising items through their text
    # (a title is nearly unique, so the text branch can act like an item ID,
    # which does not transfer to cold items):
    modality_dropout: float = 0.5  # P(drop an item's text/image in a training step; fields stay). ML-100K valid: cold R@50 .15 -> .20, warm .44 -> .38
    text_noise: float = 0.0  # std of Gaussian noise added to each text-vector entry in training
    center: bool = True  # published/scored embeddings are z minus the mean z of the training items, then L2-normalised (unseen content collapses near a common point that would otherwise crowd every ranking)
    residual: bool = False  # z = (top-D PCA of the raw content embedding, learnable) + a learned correction that starts at zero
    use_text: bool = True  # MiniLM vector of the item's `text`
    use_fields: bool = True  # categorical / multi-valued / numeric item fields
    use_image: bool = True  # only used when items have images

    def __post_init__(self) -> None:
        if self.dim < 2 or self.hidden_dim < 1 or self.field_dim < 1:
            raise ValueError("student: dim must be >= 2, hidden_dim and field_dim >= 1")
        if not (0 <= self.dropout < 1 and 0 <= self.modality_dropout < 1 and self.text_noise >= 0):
            raise ValueError("student: dropout and modality_dropout must be in [0, 1), text_noise >= 0")
        if not (self.use_text or self.use_fields or self.use_image):
            raise ValueError("student: switch on at least one modality (use_text, use_fields, use_image)")


@dataclass(frozen=True)
class IndexConfig:
    """Which faiss index serves retrieval (section `distill.index`)."""

    kind: Literal["flat", "ivf", "hnsw"] = "flat"  # flat: exact; ivf/hnsw: approximate, for large catalogs
    nlist: int = 1024  # ivf: coarse clusters (capped at N/39 so training has enough points)
    nprobe: int = 32  # ivf: clusters visited per query
    hnsw_m: int = 32  # hnsw: graph degree
    ef_construction: int = 80  # hnsw: build-time beam
    ef_search: int = 128  # hnsw: query-time beam
    use_gpu: bool = True  # only honoured when faiss.get_num_gpus() > 0

    def __post_init__(self) -> None:
        if min(self.nlist, self.nprobe, self.hnsw_m, self.ef_construction, self.ef_search) < 1:
            raise ValueError("index: nlist, nprobe, hnsw_m, ef_construction, ef_search must be >= 1")


@dataclass(frozen=True)
class DistillConfig:
    """Pipeline section `distill`: the student, its losses, training, protocol."""

    student: StudentConfig = field(default_factory=StudentConfig)  # the student's architecture (distill/student.py)
    # losses (each can be switched off for ablations; at least one must stay on)
    use_s2i: bool = True  # L_s2i: recent positives (mean of their z) -> next positive, InfoNCE
    use_id2i: bool = True  # L_id2i: 1 - cos(P_k z, teacher k's item vector) per ID teacher
    use_i2i: bool = True  # L_i2i: InfoNCE on item pairs liked by the same user (auxiliary)
    w_s2i: float = 1.0  # weight of L_s2i
    w_id2i: float = 3.0  # weight of L_id2i (3 beat 1 on ML-100K valid cold recall)
    w_i2i: float = 0.5  # weight of L_i2i
    w_geo: float = 0.0  # weight of L_geo: row-wise KL(softmax(C C^T / t) || softmax(Z Z^T / t)) over the batch's target and pair items, C the raw content embedding (the content baseline's), Z the student's z; pulls warm items towards the content geometry (0: off). 3-seed valid R@50 cold/warm at 0.1 vs 0: ML-100K .163/.335 vs .160/.329, ML-1M .130/.361 vs .115/.386 (warm -6.5%); 0.3 and 1.0 cost warm 11-53%
    geo_temperature: float = 0.1  # t of L_geo, on both the content and the student similarities
    id2i_teachers: tuple[str, ...] = ("id2item", "seq2item")  # teacher tables L_id2i distills
    matryoshka_dims: tuple[int, ...] = (16, 32)  # prefixes of z that also get the losses below
    matryoshka_losses: tuple[str, ...] = ("s2i", "i2i", "id2i")  # which losses also run on the prefixes
    temperature: float = 0.07  # initial InfoNCE temperature (learned)
    logq_correction: bool = True  # subtract log item frequency from in-batch logits (popularity-bias correction)
    query_len: int = 10  # recent positives averaged into a query (train and eval)
    i2i_window: int = 5  # L_i2i pairs: positives at most this far apart in a user's sequence
    # optimisation
    epochs: int = 10  # at most; early stopping on valid picks the epoch kept
    patience: int = 2  # epochs without a better valid score before stopping (0: never)
    lr: float = 2e-3  # AdamW learning rate
    weight_decay: float = 1e-5  # AdamW weight decay
    batch_size: int = 512  # s2i examples per step (in-batch negatives); i2i pairs: half as many
    # protocol and evaluation
    holdout_frac: float = 0.2  # share of items with train events held out of all training and reported as cold on test
    pseudo_cold_frac: float = 0.1  # share of items with train events held out of all training as the VALID cold items (disjoint from the test ones); they drive early stopping
    history_len: int = 50  # most recent positives kept per impression (>= query_len)
    select_k: int = 50  # valid Recall@select_k drives early stopping
    select_on: Literal["mean", "cold"] = "mean"  # student early stopping: valid R@select_k of pseudo-cold targets ("cold") or the mean of warm and pseudo-cold ("mean")
    eval_ks: tuple[int, ...] = (10, 50, 100)  # Recall@k reported on test
    index: IndexConfig = field(default_factory=IndexConfig)  # faiss index for retrieval (distill/index.py)
    ablations: bool = True  # evaluation also trains one student per loss switched off (the pipeline's distill stage)
    two_tower: bool = True  # evaluation also trains the content-only two-tower baseline: the student's architecture with L_s2i alone, no teachers
    diag_k: int = 10  # top-k of the neighbour-overlap diagnostic
    diag_clusters: int = 20  # k-means clusters of the NMI diagnostic
    # content encoding
    n_buckets: int = 10  # quantile buckets per numeric item field
    max_empty_text_share: float = 0.5  # refuse items whose text is null or blank for more than this share (a warning below it)
    cache_dir: str = ""  # encoder cache; "" = $RECSYS_CACHE_DIR/encoders or ~/.cache/recsys-plugin/encoders
    progress: bool = True  # tqdm bars
    threads: int = 1  # torch threads while training/evaluating (tiny models: 1 avoids OpenMP sync cost; 0 = torch default)
    seed: int | None = None  # None: the pipeline's `seed` (0 when called as a library)

    def __post_init__(self) -> None:
        expand_home(self, ("cache_dir",))
        if not (self.use_s2i or self.use_id2i or self.use_i2i):
            raise ValueError("distill: switch on at least one loss (use_s2i, use_id2i, use_i2i)")
        if min(self.w_s2i, self.w_id2i, self.w_i2i, self.w_geo) < 0:
            raise ValueError("distill: loss weights must be >= 0")
        if not 0 < self.geo_temperature <= 1.0:
            raise ValueError("distill: geo_temperature must be in (0, 1]")
        if any(d < 1 or d >= self.student.dim for d in self.matryoshka_dims):
            raise ValueError(f"distill: matryoshka_dims must be in [1, student.dim={self.student.dim})")
        if set(self.matryoshka_losses) - set(LOSSES):
            raise ValueError(f"distill: matryoshka_losses must be a subset of {list(LOSSES)}")
        unknown = set(self.id2i_teachers) - {"id2item", "seq2item"}
        if unknown or (self.use_id2i and not self.id2i_teachers):
            raise ValueError("distill: id2i_teachers must be a non-empty subset of ['id2item', 'seq2item']")
        if self.query_len < 1 or self.history_len < self.query_len:
            raise ValueError("distill: need 1 <= query_len <= history_len")
        if not (0 <= self.holdout_frac < 1 and 0 <= self.pseudo_cold_frac < 1 and self.holdout_frac + self.pseudo_cold_frac < 1):
            raise ValueError("distill: holdout_frac and pseudo_cold_frac must be in [0, 1), their sum below 1")
        if self.select_on not in ("mean", "cold"):
            raise ValueError("distill: select_on must be 'mean' or 'cold'")
        if not self.eval_ks or min(self.eval_ks) < 1 or self.select_k < 1:
            raise ValueError("distill: eval_ks and select_k must be >= 1")
        if self.threads < 0:
            raise ValueError("distill: threads must be >= 0 (0: torch default)")
        need(self, ("epochs", "i2i_window"), lambda v: v >= 1, ">= 1")
        need(self, ("batch_size",), lambda v: v >= 2, ">= 2")
        need(self, ("lr",), lambda v: v > 0, "> 0")  # NaN fails too: it once reached torch after the teachers trained
        need(self, ("patience",), lambda v: v >= 0, ">= 0")
        if not 0.01 <= self.temperature <= 1.0:
            raise ValueError("distill: temperature must be in [0.01, 1]")
        if self.weight_decay < 0:
            raise ValueError("distill: weight_decay must be >= 0")
        if min(self.diag_k, self.diag_clusters, self.n_buckets) < 1:
            raise ValueError("distill: diag_k, diag_clusters and n_buckets must be >= 1")
        if not 0 <= self.max_empty_text_share <= 1:
            raise ValueError("distill: max_empty_text_share must be in [0, 1]")

    def ablation(self, loss: str) -> "DistillConfig":
        """This config with one loss switched off."""
        import dataclasses

        return dataclasses.replace(self, **{f"use_{loss}": False})

    def two_tower_baseline(self) -> "DistillConfig":
        """The content-only two-tower baseline: the same item tower (the
        user tower is the mean of the history's item vectors), trained on the
        same train interactions with L_s2i alone: no teacher, no item pairs, no L_geo."""
        import dataclasses

        return dataclasses.replace(self, use_s2i=True, use_id2i=False, use_i2i=False, w_geo=0.0)

    def training_key(self) -> dict:
        """The keys that change the trained student (eval-only keys dropped)."""
        from features.core.config import to_dict

        return training_key_of(to_dict(self))


EVAL_ONLY_KEYS = ("eval_ks", "index", "diag_k", "diag_clusters", "cache_dir", "progress", "threads",
                  "max_empty_text_share", "two_tower")


def training_key_of(d: dict) -> dict:
    """`DistillConfig.training_key` of a config dict (as a manifest records it)."""
    d = {k: v for k, v in d.items() if k not in EVAL_ONLY_KEYS}
    if not d.get("w_geo"):  # L_geo off: the key (hence cached students) as before it existed
        d.pop("w_geo", None), d.pop("geo_temperature", None)
    return d
