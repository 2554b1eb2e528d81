"""The student: content only, gated fusion, matryoshka heads; its config; a
short fit logs a per-epoch curve through the tracker."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from distill.student import ContentSpec, ContentTensors, Student, StudentConfig
from distill.train import DistillConfig, TeacherTarget, fit_student, i2i_pairs
from features.core.config import from_dict
from features.core.errors import ConfigError
from features.core.tracker import RecordingTracker


def _tiny():
    x = ContentTensors(
        text=torch.randn(4, 6),
        tokens=[torch.tensor([[1, 2], [3, 0], [1, 2], [4, 4]])],
        numeric=torch.randn(4, 2),
        image=None,
        image_mask=None,
    )
    x.text[2], x.numeric[2] = x.text[0], x.numeric[0]  # items 0 and 2: identical content
    return x, ContentSpec.of(x, vocab_size=5)


def test_student_sees_content_not_ids():
    assert "item_id" not in {f.name for f in dataclasses.fields(ContentTensors)}
    x, spec = _tiny()
    torch.manual_seed(0)
    s = Student(StudentConfig(dim=8, hidden_dim=6, field_dim=3), spec, {"id2item": 5}, (4,))
    s.eval()
    z = s(x)
    assert z.shape == (4, 8)
    torch.testing.assert_close(z[0], z[2])  # same content -> same embedding, whatever the row
    torch.testing.assert_close(s(x.take(torch.tensor([2, 0]))), z[[2, 0]])
    assert s.project(z, "id2item", 4).shape == (4, 5) and s.project(z, "id2item").shape == (4, 5)
    emb = s.embed(x, dim=4)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)


def test_an_item_at_the_training_mean_keeps_a_unit_embedding():
    """Centring a one-item catalog (or one content for all) left z - mean = 0:
    a zero 'L2-normalised' embedding before 2026-11-30."""
    x, spec = _tiny()
    torch.manual_seed(0)
    s = Student(StudentConfig(dim=8, hidden_dim=6, field_dim=3), spec)
    s.set_center(x, np.array([0]))  # the mean of training item 0 is item 0 itself (and item 2, same content)
    for d in (4, 8):
        emb = s.embed(x, dim=d)
        np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
        np.testing.assert_allclose(emb[0], emb[2], atol=1e-6)


def test_modality_dropout_only_while_training():
    x, spec = _tiny()
    torch.manual_seed(0)
    s = Student(StudentConfig(dim=4, hidden_dim=6, field_dim=3, modality_dropout=0.9, text_noise=0.5), spec)
    s.eval()
    torch.testing.assert_close(s(x), s(x))  # deterministic at inference
    s.train()
    _, avail = s.modalities(x)
    assert avail[:, 1].all()  # fields are never dropped


def test_distill_config_validation():
    assert from_dict(DistillConfig, {}) == DistillConfig()
    cfg = from_dict(DistillConfig, {"student": {"dim": 32}, "matryoshka_dims": [8, 16], "index": {"kind": "hnsw"}})
    assert cfg.student.dim == 32 and cfg.matryoshka_dims == (8, 16) and cfg.index.kind == "hnsw"
    with pytest.raises(ConfigError, match="at least one loss"):
        from_dict(DistillConfig, {"use_s2i": False, "use_id2i": False, "use_i2i": False})
    with pytest.raises(ConfigError, match="matryoshka"):
        from_dict(DistillConfig, {"matryoshka_dims": [64]})
    with pytest.raises(ConfigError, match="unknown key"):
        from_dict(DistillConfig, {"epoch": 3})
    with pytest.raises(ConfigError, match="matryoshka_losses"):
        from_dict(DistillConfig, {"matryoshka_losses": ["l2"]})
    assert DistillConfig().ablation("i2i").use_i2i is False
    assert "eval_ks" not in DistillConfig().training_key()


def test_make_batch_positions():
    from distill.train import make_batch

    hist = np.array([[-1, 7, 3], [-1, -1, 5]])
    b = make_batch(hist, np.array([3, 9]), np.array([[5, 8]]))
    items = b.items.numpy()
    np.testing.assert_array_equal(items, [3, 5, 7, 8, 9])
    # positions point back at the same items; padding stays -1
    np.testing.assert_array_equal(np.where(b.hist.numpy() >= 0, items[b.hist.clamp_min(0).numpy()], -1), hist)
    np.testing.assert_array_equal(items[b.targets.numpy()], [3, 9])
    assert items[b.pair_a.numpy()].tolist() == [5] and items[b.pair_b.numpy()].tolist() == [8] and b.pair_b_ids.tolist() == [8]


def test_i2i_pairs_window():
    pairs = i2i_pairs([np.array([1, 2, 3, 3])], window=2)
    assert sorted(map(tuple, pairs.tolist())) == [(1, 2), (1, 3), (2, 3), (2, 3)]


def test_fit_student_logs_curve_and_learns(syn_content, syn_data):
    d = syn_data
    rng = np.random.default_rng(0)
    teachers = {"id2item": TeacherTarget(rng.standard_normal((d.n_items, 8)).astype(np.float32), d.known)}
    cfg = DistillConfig(epochs=3, batch_size=256, progress=False, id2i_teachers=("id2item",))
    x = ContentTensors.from_features(syn_content, cfg.student)
    tracker = RecordingTracker()
    fit = fit_student(x, ContentSpec.of(x, syn_content.fields.vocab_size), d, teachers, cfg, tracker=tracker, seed=0)
    assert len(fit.loss_curve) == 3 and fit.best_epoch == 2 and fit.samples_per_s > 0
    steps = [s for name, _, s in tracker.metrics if name == "student/loss"]
    assert steps == [0, 1, 2]
    assert fit.components[-1]["id2i"] < fit.components[0]["id2i"]  # the teacher is being matched
    # same seed, same student
    again = fit_student(x, ContentSpec.of(x, syn_content.fields.vocab_size), d, teachers, cfg, seed=0)
    np.testing.assert_allclose(again.student.embed(x), fit.student.embed(x), atol=1e-5)
