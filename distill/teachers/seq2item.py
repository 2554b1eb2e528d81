"""Sequence-to-item teacher: a user's recent positives -> the next positive.

History encoder by mean pooling or by a small causal transformer (SASRec
style, pre-norm, learned absolute positions, left padding); trained with
sampled softmax against a separate item *output* table, which is the
student's second L_id2i target. Plain `nn.Embedding` tables: the model is
dense over a padded (B, L) window, there is no jagged input to batch.

Training windows: each user's train positives (time order) are cut from the
end into windows of max_len + 1 items; every position predicts its next item.

Shape legend:
    B  windows (or histories) in a batch
    L  window length (max_len), left-padded with item index -1
    M  shared uniform negatives per batch
    I  items, D dim, h heads
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from distill.config import Seq2ItemConfig
from distill.teachers.fit import EpochPlan, fit_teacher
from features.core.errors import DataError
from features.core.tracker import NullTracker, Tracker

_HINT = "lower teachers.seq2item.lr (or init_std)"


class SeqEncoder(nn.Module):
    """History (B, L) of item indices (-1 = padding) -> states (B, L, D); the
    state at position t encodes items 0..t (causal)."""

    def __init__(self, cfg: Seq2ItemConfig, n_items: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.item = nn.Embedding(n_items + 1, cfg.dim, padding_idx=0)  # row 0 = padding
        self.output = self.item if cfg.tie_weights else nn.Embedding(n_items + 1, cfg.dim, padding_idx=0)
        if cfg.encoder == "transformer":
            self.pos = nn.Embedding(cfg.max_len, cfg.dim)
            layer = nn.TransformerEncoderLayer(
                cfg.dim, cfg.n_heads, 2 * cfg.dim, cfg.dropout, batch_first=True, norm_first=True, activation="gelu"
            )
            self.blocks = nn.TransformerEncoder(layer, cfg.n_layers, enable_nested_tensor=False)
            self.norm = nn.LayerNorm(cfg.dim)
        else:
            self.proj = nn.Linear(cfg.dim, cfg.dim)
        self.drop = nn.Dropout(cfg.dropout)
        # N(0, 1) rows (the nn.Embedding default) give dot products of size
        # sqrt(D): the first softmax steps would saturate
        for table in {id(self.item): self.item, id(self.output): self.output}.values():
            nn.init.normal_(table.weight, std=cfg.init_std)
            with torch.no_grad():
                table.weight[0].zero_()

    def forward(self, hist: torch.Tensor) -> torch.Tensor:
        b, length = hist.shape
        real = hist >= 0  # (B, L)
        x = self.item(hist + 1)  # (B, L, D); padding -> row 0 (zeros)
        if self.cfg.encoder == "mean":
            csum = x.cumsum(1)  # (B, L, D)
            cnt = real.cumsum(1).clamp_min(1)[..., None]  # (B, L, 1)
            return self.proj(self.drop(csum / cnt))  # (B, L, D)
        x = self.drop(x + self.pos.weight[-length:][None])  # (B, L, D): positions end at max_len - 1
        # allowed(i, j) = j <= i and (j is real or j == i): causal, no padding
        # keys, and never an all-masked row (a padded query sees itself)
        causal = torch.ones(length, length, dtype=torch.bool).tril()  # (L, L)
        allowed = causal[None] & (real[:, None, :] | torch.eye(length, dtype=torch.bool)[None])  # (B, L, L)
        mask = (~allowed).repeat_interleave(self.cfg.n_heads, 0)  # (B*h, L, L), True = blocked
        return self.norm(self.blocks(x, mask=mask))  # (B, L, D)

    def output_table(self) -> torch.Tensor:
        return self.output.weight[1:]  # (I, D)


def make_windows(sequences: Sequence[np.ndarray], max_len: int) -> np.ndarray:
    """Cut each sequence from its end into windows of max_len + 1 item indices,
    left-padded with -1: (W, max_len + 1). Sequences shorter than 2 give none."""
    rows = []
    for seq in sequences:
        seq = np.asarray(seq, dtype=np.int64)
        end = len(seq)
        while end >= 2:
            start = max(0, end - max_len - 1)
            w = np.full(max_len + 1, -1, dtype=np.int64)
            w[max_len + 1 - (end - start) :] = seq[start:end]
            rows.append(w)
            end = start + 1 if start > 0 else 0  # the next window ends where this one's inputs start
    return np.stack(rows) if rows else np.zeros((0, max_len + 1), dtype=np.int64)


class Seq2ItemTeacher:
    """Next-positive-item teacher (scikit-learn contract).

    Learned: `item_embeddings_` (I, D) (the output table), `known_items_` (I,),
    `model_` (the encoder), `loss_curve_`, `valid_curve_`, `best_epoch_`.
    `encode(histories)` gives query vectors for retrieval.
    """

    def __init__(self, config: Seq2ItemConfig = Seq2ItemConfig(), seed: int = 0) -> None:
        self.config = config
        self.seed = seed

    def fit(
        self,
        sequences: Sequence[np.ndarray],
        *,
        n_items: int,
        valid_fn: Callable[["Seq2ItemTeacher"], float] | None = None,
        tracker: Tracker | None = None,
        progress: bool = True,
    ) -> "Seq2ItemTeacher":
        """Train on per-user sequences of positive item indices in time order."""
        cfg = self.config
        tracker = tracker or NullTracker()
        windows = make_windows(sequences, cfg.max_len)  # (W, L + 1)
        if len(windows) == 0:
            raise DataError("seq2item: no user has 2 or more train positives: nothing to learn from")
        rng = np.random.default_rng(self.seed)
        known = np.zeros(n_items, dtype=bool)
        known[np.concatenate([np.asarray(s, dtype=np.int64) for s in sequences])] = True
        candidates = torch.from_numpy(np.flatnonzero(known))
        full = cfg.num_negatives >= len(candidates)
        plan = EpochPlan("seq2item", cfg.epochs, cfg.batch_size, cfg.patience, _HINT, label=f"seq2item teacher ({cfg.encoder})")
        with torch.random.fork_rng(devices=[]):  # init + dropout: seeded, caller's RNG untouched
            torch.manual_seed(self.seed)
            model = SeqEncoder(cfg, n_items)

            def step(rows: np.ndarray) -> tuple[torch.Tensor, int]:
                w = torch.from_numpy(windows[rows])  # (B, L + 1)
                inp, tgt = w[:, :-1], w[:, 1:]  # (B, L) each
                states = model(inp)  # (B, L, D)
                real = (tgt >= 0) & (inp >= 0)  # (B, L): a target with an input before it
                h, t = states[real], tgt[real]  # (n, D), (n,)
                out = model.output_table()  # (I, D)
                if full:
                    logits = h @ out[candidates].T  # (n, I_known)
                    labels = torch.searchsorted(candidates, t)
                else:
                    neg = candidates[torch.from_numpy(rng.integers(0, len(candidates), cfg.num_negatives))]  # (M,)
                    pos_logit = (h * out[t]).sum(-1, keepdim=True)  # (n, 1)
                    neg_logit = (h @ out[neg].T).masked_fill(neg[None, :] == t[:, None], float("-inf"))  # (n, M)
                    logits = torch.cat([pos_logit, neg_logit], 1)
                    labels = torch.zeros(len(t), dtype=torch.long)
                return F.cross_entropy(logits, labels), len(t)

            fit = fit_teacher(
                model, torch.optim.Adam(model.parameters(), lr=cfg.lr), plan, len(windows), step,
                rng=rng, publish=lambda: self._set_state(model, known),
                valid=None if valid_fn is None else (lambda: valid_fn(self)), tracker=tracker, progress=progress,
            )  # fmt: skip
            self.loss_curve_, self.valid_curve_, self.best_epoch_ = fit.loss_curve, fit.valid_curve, fit.best_epoch
            self._set_state(model, known)
        return self

    def _set_state(self, model: SeqEncoder, known: np.ndarray) -> np.ndarray:
        """Learned state from `model` (left in eval mode); returns the item table (I, D)."""
        model.eval()
        self.model_ = model
        self.item_embeddings_ = model.output_table().detach().numpy().copy()
        self.known_items_ = known.copy()
        return self.item_embeddings_

    def _check_fitted(self) -> None:
        if not hasattr(self, "model_"):
            from sklearn.exceptions import NotFittedError

            raise NotFittedError("this Seq2ItemTeacher is not fitted yet: call fit(...) first")

    @torch.no_grad()
    def encode(self, histories: np.ndarray, batch_size: int = 1024) -> np.ndarray:
        """Query vectors (N, D) from right-aligned histories (N, H) of item
        indices (-1 = padding); items the teacher never learned are dropped
        first, then the last max_len are encoded. Empty histories give zeros."""
        self._check_fitted()
        hist = np.asarray(histories, dtype=np.int64)
        keep = (hist >= 0) & self.known_items_[np.maximum(hist, 0)]
        # stable sort on the keep flag moves kept entries right, in order
        order = np.argsort(keep, axis=1, kind="stable")
        hist = np.where(np.take_along_axis(keep, order, 1), np.take_along_axis(hist, order, 1), -1)
        hist = hist[:, -self.config.max_len :]
        if hist.shape[1] < self.config.max_len:
            hist = np.pad(hist, ((0, 0), (self.config.max_len - hist.shape[1], 0)), constant_values=-1)
        self.model_.eval()
        outs = []
        for s in range(0, len(hist), batch_size):
            h = torch.from_numpy(hist[s : s + batch_size])
            outs.append(self.model_(h)[:, -1])  # (b, D): state after the most recent item
        q = torch.cat(outs).numpy() if outs else np.zeros((0, self.config.dim), np.float32)
        q[~(hist >= 0).any(1)] = 0.0
        return q.astype(np.float32)

    def to_state(self) -> dict[str, Any]:
        self._check_fitted()
        return {
            "config": asdict(self.config),
            "seed": self.seed,
            "n_items": len(self.known_items_),
            "model": {k: v.clone() for k, v in self.model_.state_dict().items()},
            "known_items": self.known_items_,
            "loss_curve": list(self.loss_curve_),
            "valid_curve": list(self.valid_curve_),
            "best_epoch": self.best_epoch_,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "Seq2ItemTeacher":
        t = cls(Seq2ItemConfig(**state["config"]), seed=state["seed"])
        model = SeqEncoder(t.config, int(state["n_items"]))
        model.load_state_dict({k: torch.as_tensor(v) for k, v in state["model"].items()})
        t._set_state(model, np.asarray(state["known_items"], dtype=bool))
        t.loss_curve_, t.valid_curve_, t.best_epoch_ = list(state["loss_curve"]), list(state["valid_curve"]), state["best_epoch"]
        return t


__all__ = ["Seq2ItemConfig", "Seq2ItemTeacher", "SeqEncoder", "make_windows"]
