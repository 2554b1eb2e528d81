"""Does distillation generalise to items nobody interacted with? Planted
worlds (tests/distill/planted.py) where content determines the collaborative
signal in part, or not at all; and the protocol's guarantee that the student
never trains on a held-out item (test-cold or pseudo-cold)."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from distill import evaluate as E
from distill.config import DistillConfig, ID2ItemConfig
from distill.jobs.student import SELECT_GROUPS
from distill.student import ContentSpec, ContentTensors
from distill.teachers import ID2ItemTeacher
from distill.train import DistillObjective, TeacherTarget, fit_student
from features.core.numeric import l2_normalise
from tests.distill.planted import planted_world

FAST = dict(epochs=6, patience=2, batch_size=256, progress=False)


def _world(content_share: float, seed: int = 0):
    inter, seqs, items, content = planted_world(n_users=1000, content_share=content_share, seed=seed)
    data = E.prepare_cold_start(inter, seqs, items, seed=seed)
    raw = torch.from_numpy(l2_normalise(content))
    x = ContentTensors(torch.from_numpy(content), [], torch.zeros(len(content), 0), None, None, raw)
    return data, content, x


def _fit(data, x, cfg: DistillConfig, seed: int = 0):
    teacher = ID2ItemTeacher(ID2ItemConfig(epochs=6, patience=0), seed=seed).fit(
        data.train_users, data.train_items, n_users=data.n_users, n_items=data.n_items, progress=False
    )
    targets = {"id2item": TeacherTarget(teacher.item_embeddings_, teacher.known_items_)}
    groups = SELECT_GROUPS[cfg.select_on]
    valid_fn = lambda s: E.selection_score(s.embed(x), data.valid, cfg.query_len, cfg.select_k, groups=groups)  # noqa: E731
    fit = fit_student(x, ContentSpec.of(x, 0), data, targets, cfg, valid_fn=valid_fn, seed=seed)
    return fit, teacher


def _cold_recall(emb: np.ndarray, data, q: int) -> tuple[float, int]:
    m = E.evaluate_retrievers({"m": E.embedding_retriever(emb, q)}, data.test, [50])
    return m["recall@50_cold_m"], int(data.test.cold.sum())


def _cfg(**kw) -> DistillConfig:
    cfg = DistillConfig(id2i_teachers=("id2item",), **(FAST | kw))
    return dataclasses.replace(cfg, student=dataclasses.replace(cfg.student, use_fields=False, use_image=False))


def test_student_never_trains_on_held_out_items(monkeypatch):
    """Every batch the objective is fed, and every teacher row it regresses
    to, is a visible (warm) item: no test-cold or pseudo-cold item's ID or
    interaction reaches training."""
    data, _, x = _world(1.0)
    hidden = data.hidden
    assert data.heldout.any() and data.pseudo_cold.any() and not (data.heldout & data.pseudo_cold).any()
    seen: list[np.ndarray] = []
    forward = DistillObjective.forward

    def spy(self, content, b):
        seen.append(b.items.numpy().copy())
        for t in (b.target_ids, b.pair_b_ids):
            if t is not None:
                assert not hidden[t.numpy()].any()
        for n in self.names:  # the teacher rows it can regress to are unknown for hidden items
            assert not getattr(self, f"known_{n}")[torch.from_numpy(hidden)].any()
        return forward(self, content, b)

    monkeypatch.setattr(DistillObjective, "forward", spy)
    cfg = _cfg(epochs=1)
    _fit(data, x, cfg)
    _fit(data, x, cfg.two_tower_baseline())
    items = np.concatenate(seen)
    assert len(seen) > 2 and not hidden[items].any()
    assert set(np.unique(items)) <= set(np.flatnonzero(data.known))


def test_protocol_pseudo_cold_is_disjoint_from_test_cold():
    data, _, _ = _world(1.0)
    test_cold = ~data.warm & ~data.pseudo_cold
    assert np.array_equal(data.valid.cold, data.pseudo_cold[data.valid.targets])
    assert not test_cold[data.valid.targets].any()  # valid never scores a test-cold item
    assert not data.pseudo_cold[data.test.targets].any()  # test never reports a pseudo-cold item
    assert np.array_equal(data.test.cold, test_cold[data.test.targets])
    for arr in (data.train_items, data.train.targets, data.train.hist[data.train.hist >= 0]):
        assert not data.hidden[arr].any()
    assert data.valid.cold.any() and (~data.valid.cold).any()


def test_student_beats_content_where_content_partly_determines_the_signal():
    data, content, x = _world(0.7)
    cfg = _cfg()
    fit, _ = _fit(data, x, cfg)
    student, n = _cold_recall(fit.student.embed(x), data, cfg.query_len)
    raw, _ = _cold_recall(content, data, cfg.query_len)
    assert n > 300
    assert student > 1.3 * raw, (student, raw)


def test_student_does_not_beat_content_where_content_carries_no_signal():
    data, content, x = _world(0.0)
    cfg = _cfg()
    fit, _ = _fit(data, x, cfg)
    student, n = _cold_recall(fit.student.embed(x), data, cfg.query_len)
    raw, _ = _cold_recall(content, data, cfg.query_len)
    se = np.sqrt(max(raw, 0.05) * (1 - raw) / n)
    assert student <= raw + 3 * se, (student, raw, se)
