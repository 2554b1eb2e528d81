"""ID-to-item teacher: user and item ID embeddings (matrix factorisation) in
TorchRec tables, trained on train-split positives with BPR or sampled softmax.

Its item table is one of the student's L_id2i targets. Items it never saw
(held out, or without a train positive) keep their random initial rows and are
flagged in `known_items_`; evaluation ranks only known items for this teacher.

Shape legend:
    B  (user, positive item) pairs in a batch
    M  shared uniform negatives per batch (sampled softmax)
    U  users, I items, D dim
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from distill.config import ID2ItemConfig
from distill.teachers.fit import EpochPlan, fit_teacher
from features.core.errors import DataError
from features.core.tracker import NullTracker, Tracker


_HINT = "lower teachers.id2item.lr (or init_std)"


def build_tables(n_users: int, n_items: int, dim: int):
    """The teacher's TorchRec tables: `user` (feature `user`) and `item`
    (features `pos_item`, `neg_item`: one table, two lookups). Sum pooling over
    one ID per bag is a plain lookup."""
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, PoolingType

    return EmbeddingBagCollection(
        tables=[
            EmbeddingBagConfig(name="user", embedding_dim=dim, num_embeddings=n_users, feature_names=["user"], pooling=PoolingType.SUM),
            EmbeddingBagConfig(
                name="item", embedding_dim=dim, num_embeddings=n_items, feature_names=["pos_item", "neg_item"], pooling=PoolingType.SUM
            ),
        ],
        device=torch.device("cpu"),
    )


def make_kjt(users: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor | None = None):
    """The one place this teacher builds its KeyedJaggedTensor: one ID per bag
    for `user`, `pos_item` and, for BPR, `neg_item`, each (B,). Without
    negatives `neg_item` has empty bags (the collection wants every feature)."""
    from torchrec import KeyedJaggedTensor

    b = len(users)
    ones = torch.ones(b, dtype=torch.int32)
    neg_values = neg if neg is not None else users.new_zeros(0)
    lengths = torch.cat([ones, ones, ones if neg is not None else torch.zeros(b, dtype=torch.int32)])
    return KeyedJaggedTensor.from_lengths_sync(
        keys=["user", "pos_item", "neg_item"], values=torch.cat([users, pos, neg_values]), lengths=lengths
    )


class ID2ItemTeacher:
    """Matrix factorisation teacher (scikit-learn contract).

    Learned: `item_embeddings_` (I, D), `user_embeddings_` (U, D), `known_items_`
    (I,) bool, `loss_curve_`, `valid_curve_`, `best_epoch_`.

    Example:
        >>> t = ID2ItemTeacher(ID2ItemConfig(dim=4, epochs=2), seed=0)
        >>> t = t.fit(np.array([0, 0, 1]), np.array([0, 1, 2]), n_users=2, n_items=4, progress=False)
        >>> t.item_embeddings_.shape, t.known_items_.tolist()
        ((4, 4), [True, True, True, False])
    """

    def __init__(self, config: ID2ItemConfig = ID2ItemConfig(), seed: int = 0) -> None:
        self.config = config
        self.seed = seed

    def fit(
        self,
        users: np.ndarray,
        items: np.ndarray,
        *,
        n_users: int,
        n_items: int,
        valid_fn: Callable[["ID2ItemTeacher"], float] | None = None,
        tracker: Tracker | None = None,
        progress: bool = True,
    ) -> "ID2ItemTeacher":
        """Train on positive pairs (users[i], items[i]) given as dense indices.

        `valid_fn(self)` scores the current epoch on the valid split (higher is
        better); the best epoch's tables are kept and training stops after
        `patience` epochs without improvement.
        """
        cfg = self.config
        tracker = tracker or NullTracker()
        users = np.asarray(users, dtype=np.int64)
        items = np.asarray(items, dtype=np.int64)
        if len(users) != len(items) or len(users) == 0:
            raise DataError("id2item: need as many users as items, and at least one (user, item) train positive")
        rng = np.random.default_rng(self.seed)
        known = np.zeros(n_items, dtype=bool)
        known[items] = True
        candidates = torch.from_numpy(np.flatnonzero(known))  # negatives come from known items
        plan = EpochPlan("id2item", cfg.epochs, cfg.batch_size, cfg.patience, _HINT)
        # Parameter init and dropout-free training use the global torch RNG:
        # fork it so a seed here neither depends on nor disturbs the caller's.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            tables = build_tables(n_users, n_items, cfg.dim)
            for p in tables.parameters():
                torch.nn.init.normal_(p, std=cfg.init_std)

            def step(rows: np.ndarray) -> tuple[torch.Tensor, int]:
                u, i = torch.from_numpy(users[rows]), torch.from_numpy(items[rows])  # (B,) each
                return self._loss(tables, u, i, candidates, rng), len(rows)

            fit = fit_teacher(
                tables, torch.optim.Adam(tables.parameters(), lr=cfg.lr), plan, len(users), step,
                rng=rng, publish=lambda: self._set_state(tables, known),
                valid=None if valid_fn is None else (lambda: valid_fn(self)), tracker=tracker, progress=progress,
            )  # fmt: skip
            self.loss_curve_, self.valid_curve_, self.best_epoch_ = fit.loss_curve, fit.valid_curve, fit.best_epoch
            self._set_state(tables, known)
        return self

    def _loss(self, tables, u: torch.Tensor, i: torch.Tensor, candidates: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        cfg = self.config
        if cfg.loss == "bpr":
            j = candidates[torch.from_numpy(rng.integers(0, len(candidates), len(u)))]  # (B,)
            out = tables(make_kjt(u, i, j))
            eu, ei, ej = out["user"], out["pos_item"], out["neg_item"]  # (B, D) each
            loss = -F.logsigmoid((eu * (ei - ej)).sum(-1)).mean()
            reg = eu.pow(2).sum(-1) + ei.pow(2).sum(-1) + ej.pow(2).sum(-1)
        else:
            out = tables(make_kjt(u, i))
            eu, ei = out["user"], out["pos_item"]  # (B, D)
            neg = candidates[torch.from_numpy(rng.integers(0, len(candidates), cfg.num_negatives))]  # (M,)
            # shared negatives: one gather from the table for the whole batch
            en = tables.embedding_bags["item"].weight.index_select(0, neg)  # (M, D)
            pos_logit = (eu * ei).sum(-1, keepdim=True)  # (B, 1)
            neg_logit = (eu @ en.T).masked_fill(neg[None, :] == i[:, None], float("-inf"))  # (B, M)
            logits = torch.cat([pos_logit, neg_logit], 1)  # (B, 1 + M)
            loss = F.cross_entropy(logits, torch.zeros(len(u), dtype=torch.long))
            reg = eu.pow(2).sum(-1) + ei.pow(2).sum(-1)
        return loss + cfg.l2 * reg.mean()

    def _set_state(self, tables, known: np.ndarray) -> np.ndarray:
        """Learned state from `tables`; returns the item table (I, D)."""
        self.user_embeddings_ = tables.embedding_bags["user"].weight.detach().numpy().copy()
        self.item_embeddings_ = tables.embedding_bags["item"].weight.detach().numpy().copy()
        self.known_items_ = known.copy()
        return self.item_embeddings_

    def _check_fitted(self) -> None:
        if not hasattr(self, "item_embeddings_"):
            from sklearn.exceptions import NotFittedError

            raise NotFittedError("this ID2ItemTeacher is not fitted yet: call fit(...) first")

    def score(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """Dot-product scores of (user, item) pairs, (n,)."""
        self._check_fitted()
        return (self.user_embeddings_[users] * self.item_embeddings_[items]).sum(-1)

    def to_state(self) -> dict[str, Any]:
        """Everything needed to rebuild the fitted teacher (plain types + arrays)."""
        self._check_fitted()
        return {
            "config": asdict(self.config),
            "seed": self.seed,
            "item_embeddings": self.item_embeddings_,
            "user_embeddings": self.user_embeddings_,
            "known_items": self.known_items_,
            "loss_curve": list(self.loss_curve_),
            "valid_curve": list(self.valid_curve_),
            "best_epoch": self.best_epoch_,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "ID2ItemTeacher":
        t = cls(ID2ItemConfig(**state["config"]), seed=state["seed"])
        t.item_embeddings_ = np.asarray(state["item_embeddings"], dtype=np.float32)
        t.user_embeddings_ = np.asarray(state["user_embeddings"], dtype=np.float32)
        t.known_items_ = np.asarray(state["known_items"], dtype=bool)
        t.loss_curve_, t.valid_curve_ = list(state["loss_curve"]), list(state["valid_curve"])
        t.best_epoch_ = int(state["best_epoch"])
        return t


__all__ = ["ID2ItemConfig", "ID2ItemTeacher", "build_tables", "make_kjt"]
