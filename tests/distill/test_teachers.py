"""Teachers: scikit-learn contract, TorchRec inputs, training windows, and that
they learn a planted two-cluster structure."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.exceptions import NotFittedError

from distill.teachers import ID2ItemConfig, ID2ItemTeacher, Seq2ItemConfig, Seq2ItemTeacher, TeachersConfig
from distill.teachers.id2item import build_tables, make_kjt
from distill.teachers.seq2item import SeqEncoder, make_windows
from features.core.config import from_dict
from features.core.errors import ConfigError

# 20 users, 10 items: users 0-9 like items 0-4, users 10-19 like items 5-9
RNG = np.random.default_rng(0)
USERS = np.repeat(np.arange(20), 8)
ITEMS = np.concatenate([RNG.integers(0, 5, 8) if u < 10 else RNG.integers(5, 10, 8) for u in range(20)])
SEQS = [ITEMS[USERS == u] for u in range(20)]


def _cluster_gap(emb: np.ndarray) -> float:
    e = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    sim = e @ e.T
    same = np.equal.outer(np.arange(10) < 5, np.arange(10) < 5) & ~np.eye(10, dtype=bool)
    diff = ~np.equal.outer(np.arange(10) < 5, np.arange(10) < 5)
    return float(sim[same].mean() - sim[diff].mean())


def _learned_attrs(est) -> set[str]:
    return set(vars(est)) - {"config", "seed"}


@pytest.mark.parametrize("loss", ["bpr", "sampled_softmax"])
def test_id2item_contract_and_learning(loss):
    t = ID2ItemTeacher(ID2ItemConfig(dim=8, loss=loss, epochs=30, batch_size=32, num_negatives=4, lr=0.05), seed=0)
    assert set(vars(t)) == {"config", "seed"}  # __init__ stores parameters only
    with pytest.raises(NotFittedError):
        t.score(np.array([0]), np.array([0]))
    items = np.where(ITEMS == 9, 8, ITEMS)  # item 9 never liked: unknown to the teacher
    assert t.fit(USERS, items, n_users=20, n_items=10, progress=False) is t
    assert all(a.endswith("_") for a in _learned_attrs(t)) and _learned_attrs(t)
    assert t.item_embeddings_.shape == (10, 8) and t.user_embeddings_.shape == (20, 8)
    assert t.known_items_.tolist() == [True] * 9 + [False]
    assert _cluster_gap(np.vstack([t.item_embeddings_[:9], t.item_embeddings_[8:9]])) > 0.3
    # a user scores its own cluster above the other one
    assert t.score(np.array([0, 0]), np.array([1, 6])).argmax() == 0
    clone = ID2ItemTeacher.from_state(t.to_state())
    np.testing.assert_array_equal(clone.item_embeddings_, t.item_embeddings_)


def test_id2item_early_stopping_keeps_best_epoch():
    scores = iter([0.1, 0.5, 0.2, 0.1, 0.0, 0.0])
    t = ID2ItemTeacher(ID2ItemConfig(dim=4, epochs=6, patience=2), seed=0)
    t.fit(USERS, ITEMS, n_users=20, n_items=10, valid_fn=lambda _: next(scores), progress=False)
    assert t.best_epoch_ == 1 and len(t.loss_curve_) == 4  # stopped 2 epochs after the best


def test_torchrec_tables_and_kjt():
    tables = build_tables(n_users=3, n_items=5, dim=4)
    out = tables(make_kjt(torch.tensor([0, 2]), torch.tensor([1, 4]), torch.tensor([3, 3])))
    w = tables.embedding_bags["item"].weight
    torch.testing.assert_close(out["pos_item"], w[[1, 4]])
    torch.testing.assert_close(out["neg_item"], w[[3, 3]])
    out = tables(make_kjt(torch.tensor([0, 2]), torch.tensor([1, 4])))  # no negatives: empty bags
    assert out["neg_item"].abs().sum() == 0


def test_make_windows_covers_each_target_once():
    w = make_windows([np.array([1, 2, 3, 4, 5]), np.array([7]), np.array([8, 9])], max_len=2)
    np.testing.assert_array_equal(w, [[3, 4, 5], [1, 2, 3], [-1, 8, 9]])
    targets = np.concatenate([row[1:][row[:-1] >= 0] for row in w])
    assert sorted(targets.tolist()) == [2, 3, 4, 5, 9]


@pytest.mark.parametrize("encoder", ["mean", "transformer"])
def test_seq2item_contract_and_learning(encoder):
    cfg = Seq2ItemConfig(encoder=encoder, dim=16, n_heads=2, n_layers=1, max_len=6, epochs=25, num_negatives=4, lr=0.02, dropout=0.0, batch_size=8)
    t = Seq2ItemTeacher(cfg, seed=0)
    assert set(vars(t)) == {"config", "seed"}
    with pytest.raises(NotFittedError):
        t.encode(np.array([[0, 1]]))
    assert t.fit(SEQS, n_items=10, progress=False) is t
    assert all(a.endswith("_") for a in _learned_attrs(t))
    assert t.item_embeddings_.shape == (10, 16) and t.known_items_.all()
    # a history from cluster A ranks cluster A above cluster B
    q = t.encode(np.array([[-1, 0, 1, 2], [-1, 5, 6, 7], [-1, -1, -1, -1]]))  # (3, D)
    scores = q @ t.item_embeddings_.T
    assert scores[0, :5].mean() > scores[0, 5:].mean() and scores[1, 5:].mean() > scores[1, :5].mean()
    assert np.all(q[2] == 0)  # empty history: no query
    clone = Seq2ItemTeacher.from_state(t.to_state())
    np.testing.assert_allclose(clone.encode(np.array([[0, 1, 2]])), t.encode(np.array([[0, 1, 2]])), rtol=1e-5, atol=1e-6)


def test_transformer_is_causal_and_padding_safe():
    torch.manual_seed(0)
    enc = SeqEncoder(Seq2ItemConfig(encoder="transformer", dim=8, n_heads=2, n_layers=3, max_len=5, dropout=0.0), n_items=10)
    enc.eval()
    a = enc(torch.tensor([[-1, -1, 1, 2, 3]]))
    b = enc(torch.tensor([[-1, -1, 1, 2, 9]]))  # only the last item differs
    assert torch.isfinite(a).all()
    torch.testing.assert_close(a[:, :4], b[:, :4])  # earlier states do not see the future
    assert not torch.allclose(a[:, 4], b[:, 4])


def test_teachers_config_loads_strictly():
    cfg = from_dict(TeachersConfig, {"id2item": {"loss": "bpr"}, "seq2item": {"encoder": "transformer"}, "seed": 3})
    assert cfg.id2item.loss == "bpr" and cfg.seq2item.encoder == "transformer" and cfg.seed == 3
    assert from_dict(TeachersConfig, {}) == TeachersConfig()
    with pytest.raises(ConfigError, match="loss"):
        from_dict(TeachersConfig, {"id2item": {"loss": "mse"}})
    with pytest.raises(ConfigError, match="divisible"):
        from_dict(TeachersConfig, {"seq2item": {"dim": 10, "n_heads": 3, "encoder": "transformer"}})
    # the mean encoder has no heads: its dim needs no divisor (an A/B of dim alone must be possible)
    assert from_dict(TeachersConfig, {"seq2item": {"dim": 10, "n_heads": 3}}).seq2item.dim == 10


def test_fit_teacher_loop_weights_losses_keeps_best_and_stops_on_divergence():
    from distill.teachers.fit import EpochPlan, fit_teacher
    from features.core.errors import TrainingDiverged
    from features.core.tracker import RecordingTracker

    torch.manual_seed(0)
    module = torch.nn.Linear(2, 1, bias=False)
    opt = torch.optim.SGD(module.parameters(), lr=0.0)  # weights stay put: losses are exact
    seen: list[list[int]] = []

    def step(rows: np.ndarray) -> tuple[torch.Tensor, int]:
        seen.append(sorted(rows.tolist()))
        loss = module.weight.sum() * 0 + float(len(rows))  # a step's loss = its size
        return loss, len(rows)

    snapshots = iter([0.1, 0.5, 0.2, 0.1, 0.0])
    plan = EpochPlan("toy", epochs=5, batch_size=2, patience=2, hint="lower toy.lr")
    tracker = RecordingTracker()
    fit = fit_teacher(
        module, opt, plan, 5, step, rng=np.random.default_rng(0),
        publish=lambda: module.weight.detach().numpy(), valid=lambda: next(snapshots), tracker=tracker, progress=False,
    )  # fmt: skip
    assert sorted(x for rows in seen[:3] for x in rows) == [0, 1, 2, 3, 4]  # every example once per epoch
    assert fit.loss_curve == [pytest.approx((2 * 2 + 2 * 2 + 1 * 1) / 5)] * 4  # weighted by the step sizes
    assert fit.best_epoch == 1 and fit.valid_curve == [0.1, 0.5, 0.2, 0.1]  # stopped 2 epochs after the best
    assert ("teachers/toy/valid", 0.5, 1) in tracker.metrics

    def bad_step(rows: np.ndarray) -> tuple[torch.Tensor, int]:
        return module.weight.sum() * float("nan"), len(rows)

    with pytest.raises(TrainingDiverged, match=r"toy teacher: .* epoch 0, step 0: .*lower toy.lr"):
        fit_teacher(
            module, opt, plan, 5, bad_step, rng=np.random.default_rng(0),
            publish=lambda: np.zeros(1), valid=None, tracker=tracker, progress=False,
        )  # fmt: skip
