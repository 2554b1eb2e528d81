"""DistillConfig and the student training loop.

Each step draws a batch of B sequence-to-item examples (a user's recent
positives -> the next positive, train split, held-out items removed) and B/2
co-interacted item pairs (oriented at random); the student embeds the union
of the items involved once (`make_batch`), and `DistillObjective`, the
training wrapper around the student, sums the switched-on losses:

    L = w_s2i L_s2i + w_id2i L_id2i + w_i2i L_i2i [+ w_geo L_geo]   (distill/losses.py)

L_id2i covers every item of the batch that the teachers know; L_geo (when
w_geo > 0) the distinct s2i targets and pair items, against the frozen raw
content embedding (`ContentFeatures.raw_embedding`, the content baseline). After each
epoch the student's centre (mean z of the training items, see
`Student.set_center`) is updated and the student is scored on the VALID
split (`evaluate.selection_score`: Recall@select_k of the pseudo-cold
targets, averaged with the warm targets' under `select_on: mean`); the best
epoch is kept; training stops after `patience` epochs without improvement.
No batch ever holds a held-out item (test-cold or pseudo-cold: the
protocol removed them from `data.train`, the pairs and the teacher tables),
and the test split is never looked at here.

Shape legend:
    B  examples (or pairs) per batch
    L  query length (query_len)
    U  distinct items in a batch
    I  items, D student dim, K a teacher's dim
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from distill.config import LOSSES, DistillConfig
from distill.early_stopping import BestOnValid, check_finite
from distill.evaluate import ColdStartData
from distill.losses import Temperature, geo_loss, i2i_loss, id2i_loss, s2i_loss
from distill.student import ContentSpec, ContentTensors, Student
from features.core.errors import DataError
from features.core.tracker import NullTracker, Tracker


@dataclass
class TeacherTarget:
    """A frozen teacher item table for L_id2i."""

    table: np.ndarray  # (I, K)
    known: np.ndarray  # (I,) bool


@dataclass
class StudentFit:
    student: Student
    loss_curve: list[float]
    valid_curve: list[float]
    best_epoch: int
    samples_per_s: float  # s2i examples (or pairs) per second of optimisation steps, valid scoring excluded
    seconds: float  # wall time including valid scoring
    components: list[dict[str, float]] = field(default_factory=list)  # per-epoch mean of each loss


def i2i_pairs(sequences: list[np.ndarray], window: int) -> np.ndarray:
    """(P, 2) item pairs liked by the same user at most `window` positions apart
    (both orders come from the symmetric loss); pairs of an item with itself dropped."""
    out = []
    for seq in sequences:
        for d in range(1, min(window, len(seq) - 1) + 1):
            p = np.stack([seq[:-d], seq[d:]], 1)
            out.append(p[p[:, 0] != p[:, 1]])
    return np.concatenate(out) if out else np.zeros((0, 2), dtype=np.int64)


@dataclass
class StudentBatch:
    """One training step's examples, as positions into `items` (the distinct
    items the student embeds once for the whole step)."""

    items: torch.Tensor  # (U,) item indices
    hist: torch.Tensor | None = None  # (B, L) positions into items, -1 = padding
    targets: torch.Tensor | None = None  # (B,) positions into items
    target_ids: torch.Tensor | None = None  # (B,) item indices (duplicates are not negatives)
    pair_a: torch.Tensor | None = None  # (P,) positions into items
    pair_b: torch.Tensor | None = None  # (P,)
    pair_b_ids: torch.Tensor | None = None  # (P,) item indices


def make_batch(
    hist: np.ndarray | None, targets: np.ndarray | None, pairs: np.ndarray | None, fallback: np.ndarray | None = None
) -> StudentBatch:
    """A StudentBatch from s2i examples (hist (B, L) item indices with -1 padding,
    targets (B,)) and/or i2i pairs (P, 2); `fallback` items when both are absent."""
    parts = []
    if hist is not None:
        parts += [hist[hist >= 0], targets]
    if pairs is not None:
        parts += [pairs[:, 0], pairs[:, 1]]
    if not parts:
        parts = [fallback]
    uniq, inv = np.unique(np.concatenate(parts), return_inverse=True)
    b = StudentBatch(items=torch.from_numpy(uniq))
    offset = 0
    if hist is not None:
        n_h = int((hist >= 0).sum())
        pos = np.full(hist.shape, -1, dtype=np.int64)
        pos[hist >= 0] = inv[:n_h]
        b.hist = torch.from_numpy(pos)
        b.targets = torch.from_numpy(inv[n_h : n_h + len(targets)])
        b.target_ids = torch.from_numpy(targets)
        offset = n_h + len(targets)
    if pairs is not None:
        b.pair_a = torch.from_numpy(inv[offset : offset + len(pairs)])
        b.pair_b = torch.from_numpy(inv[offset + len(pairs) : offset + 2 * len(pairs)])
        b.pair_b_ids = torch.from_numpy(np.ascontiguousarray(pairs[:, 1]))
    return b


class DistillObjective(nn.Module):
    """Training wrapper: the student plus what only training needs (learnable
    temperatures, frozen teacher tables, in-batch sampling log-probabilities,
    the raw content embedding (I, R) of L_geo).
    `forward` returns the weighted total and each switched-on loss; the
    student itself only maps content to z and is used unchanged at eval."""

    def __init__(
        self,
        student: Student,
        cfg: DistillConfig,
        teachers: Mapping[str, TeacherTarget],
        log_q: Mapping[str, np.ndarray],
        geo_content: np.ndarray | torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.student, self.cfg = student, cfg
        self.temp_s2i, self.temp_i2i = Temperature(cfg.temperature), Temperature(cfg.temperature)
        self.names = list(teachers)
        for n, t in teachers.items():  # buffers: frozen, never in the optimiser
            self.register_buffer(f"table_{n}", torch.from_numpy(np.asarray(t.table, dtype=np.float32)), persistent=False)
            self.register_buffer(f"known_{n}", torch.from_numpy(np.asarray(t.known, dtype=bool)), persistent=False)
        for k, v in log_q.items():
            self.register_buffer(f"log_q_{k}", torch.from_numpy(v.astype(np.float32)), persistent=False)
        if cfg.w_geo > 0:
            if geo_content is None:
                raise ValueError("distill: w_geo > 0 needs the raw content embedding: pass geo_content=ContentFeatures.raw_embedding() (or set distill.w_geo: 0)")
            self.register_buffer("geo_content", torch.as_tensor(np.asarray(geo_content, dtype=np.float32)), persistent=False)
        self.mdims = {loss: cfg.matryoshka_dims if loss in cfg.matryoshka_losses else () for loss in LOSSES}

    def forward(self, content: ContentTensors, b: StudentBatch) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        z = self.student(content.take(b.items))  # (U, D)
        out: dict[str, torch.Tensor] = {}
        if b.hist is not None:
            mask = b.hist >= 0  # (B, L)
            hz = z[b.hist.clamp_min(0)] * mask[..., None]  # (B, L, D)
            lq = self.log_q_s2i[b.target_ids] if cfg.logq_correction else None
            out["s2i"] = s2i_loss(hz, mask, z[b.targets], self.temp_s2i(), b.target_ids, self.mdims["s2i"], lq)
        if b.pair_a is not None:
            lq = self.log_q_i2i[b.pair_b_ids] if cfg.logq_correction else None
            out["i2i"] = i2i_loss(z[b.pair_a], z[b.pair_b], self.temp_i2i(), b.pair_b_ids, self.mdims["i2i"], lq)
        if self.names:
            prefixes = self.student.prefixes if self.mdims["id2i"] else self.student.prefixes[-1:]
            proj, tgt, known = [], [], []
            for n in self.names:
                for d in prefixes:
                    proj.append(self.student.project(z, n, d))  # (U, K)
                    tgt.append(getattr(self, f"table_{n}")[b.items])  # (U, K)
                    known.append(getattr(self, f"known_{n}")[b.items])  # (U,)
            # the prefixes are extra entries of the same teacher: average them
            out["id2i"] = id2i_loss(proj, tgt, known) / len(prefixes)
        if cfg.w_geo > 0:  # the s2i targets and pair items (not the histories: a U x U matrix would cost more than the rest)
            parts = [p for p in (b.targets, b.pair_a, b.pair_b) if p is not None]
            pos = torch.unique(torch.cat(parts)) if parts else torch.arange(len(b.items))  # positions into items
            out["geo"] = geo_loss(z[pos], self.geo_content[b.items[pos]], cfg.geo_temperature)
        weights = {"s2i": cfg.w_s2i, "i2i": cfg.w_i2i, "id2i": cfg.w_id2i, "geo": cfg.w_geo}
        out["loss"] = sum(weights[k] * v for k, v in out.items())
        return out


def fit_student(
    content: ContentTensors,
    spec: ContentSpec,
    data: ColdStartData,
    teachers: Mapping[str, TeacherTarget],
    cfg: DistillConfig,
    *,
    valid_fn: Callable[[Student], float] | None = None,
    tracker: Tracker | None = None,
    seed: int = 0,
    geo_content: np.ndarray | None = None,
) -> StudentFit:
    """Train a student on `data.train` (and its pairs) against frozen `teachers`.

    `valid_fn(student)` scores an epoch on the valid split (higher is
    better); the best epoch is kept. Seeded: same inputs and seed, same student.
    `geo_content` (I, R): the raw content embedding L_geo aligns with
    (required when cfg.w_geo > 0, ignored otherwise).
    """
    from tqdm.auto import tqdm

    tracker = tracker or NullTracker()
    rng = np.random.default_rng(seed)
    ex = data.train
    hist_all = ex.hist[:, -cfg.query_len :]  # (N, L)
    pairs = i2i_pairs(data.train_sequences, cfg.i2i_window) if cfg.use_i2i else np.zeros((0, 2), np.int64)
    use_i2i, use_s2i = cfg.use_i2i and len(pairs) > 0, cfg.use_s2i and len(ex) > 1
    names = [t for t in cfg.id2i_teachers if t in teachers] if cfg.use_id2i else []
    if cfg.use_id2i and not names:
        raise ValueError("distill: use_id2i is on but no teacher table was given")
    if not (use_s2i or use_i2i or names):
        raise DataError("distill: no training signal (no train examples, no item pairs, no teacher tables)")
    # log-probability of each item to be an in-batch negative (add-one smoothed)
    freq_t = np.bincount(ex.targets, minlength=data.n_items) + 1.0
    freq_p = np.bincount(pairs.ravel(), minlength=data.n_items) + 1.0
    log_q = {"s2i": np.log(freq_t / freq_t.sum()), "i2i": np.log(freq_p / freq_p.sum())}
    known_idx = np.flatnonzero(data.known)
    # an epoch is as many steps as one pass over the s2i examples takes, with or
    # without L_s2i, so that ablations get the same number of updates
    n_steps = max(1, -(-(len(ex) or len(pairs) or len(known_idx)) // cfg.batch_size))
    # pairs (and fallback items) are drawn with replacement: never more per
    # step than there are, or a batch size far above the data's would only
    # repeat them in a (P, P) logit matrix that can exhaust memory
    n_pairs = max(2, min(cfg.batch_size // 2, len(pairs)))
    n_fallback = max(2, min(cfg.batch_size, len(known_idx)))
    with torch.random.fork_rng(devices=[]):  # init + dropout seeded; the caller's RNG untouched
        torch.manual_seed(seed)
        student = Student(cfg.student, spec, {n: np.asarray(teachers[n].table).shape[1] for n in names}, cfg.matryoshka_dims)
        if content.raw is not None:
            student.init_residual(content.raw)
        objective = DistillObjective(student, cfg, {n: teachers[n] for n in names}, log_q, geo_content)
        opt = torch.optim.AdamW(objective.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        loss_curve, valid_curve, components = [], [], []
        stopper = BestOnValid(cfg.patience)
        t0 = time.perf_counter()
        seen, step_seconds = 0, 0.0
        bar = tqdm(range(cfg.epochs), desc="student", unit="epoch", disable=None if cfg.progress else True)
        for epoch in bar:
            objective.train()
            order = rng.permutation(len(ex))
            sums: dict[str, float] = {}
            t_epoch = time.perf_counter()
            for step in range(n_steps):
                b_idx = order[step * cfg.batch_size : (step + 1) * cfg.batch_size]
                pr = None
                if use_i2i:
                    pr = pairs[rng.integers(0, len(pairs), n_pairs)]  # (B/2, 2)
                    pr = np.where((rng.random(len(pr)) < 0.5)[:, None], pr[:, ::-1], pr)  # random orientation
                s2i_ok = use_s2i and len(b_idx) > 1
                batch = make_batch(
                    hist_all[b_idx] if s2i_ok else None,
                    ex.targets[b_idx] if s2i_ok else None,
                    pr,
                    fallback=known_idx[rng.integers(0, len(known_idx), n_fallback)] if len(known_idx) else None,
                )
                losses = objective(content, batch)
                check_finite(float(losses["loss"].detach()), "distill student", epoch, step, "lower distill.lr (or the loss weights w_*)")
                opt.zero_grad()
                losses["loss"].backward()
                opt.step()
                for k, v in losses.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach())
                seen += len(b_idx) if s2i_ok else cfg.batch_size
            step_seconds += time.perf_counter() - t_epoch
            comp = {k: v / n_steps for k, v in sums.items()}
            loss_curve.append(comp["loss"])
            components.append(comp)
            metrics = {f"student/{k}": v for k, v in comp.items()}
            metrics["student/temperature_s2i"] = float(objective.temp_s2i().detach())
            student.set_center(content, known_idx)
            if valid_fn is not None:
                score = float(valid_fn(student))
                valid_curve.append(score)
                metrics["student/valid"] = score
                stopper.update(score, epoch, student)
            tracker.log_metrics(metrics, step=epoch)
            bar.set_postfix(loss=f"{comp['loss']:.4f}", valid=f"{valid_curve[-1]:.4f}" if valid_curve else "-")
            if stopper.should_stop:
                break
        seconds = time.perf_counter() - t0
        best_epoch = stopper.restore(student, len(loss_curve))
        if stopper.state is None:  # no valid scores: the last epoch, centred on its own z
            student.set_center(content, known_idx)
        student.eval()
    return StudentFit(
        student=student,
        loss_curve=loss_curve,
        valid_curve=valid_curve,
        best_epoch=best_epoch,
        samples_per_s=seen / max(step_seconds, 1e-9),
        seconds=seconds,
        components=components,
    )


__all__ = ["DistillConfig", "TeacherTarget", "StudentFit", "StudentBatch", "DistillObjective", "LOSSES", "fit_student", "make_batch", "i2i_pairs"]
