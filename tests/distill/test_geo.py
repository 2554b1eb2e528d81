"""L_geo (relational regulariser towards the raw content geometry): the loss
itself, its wiring in DistillObjective, and its config key (off by default,
and off means training and the cached-student key are unchanged)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from distill.config import DistillConfig
from distill.losses import geo_loss
from distill.student import ContentSpec, ContentTensors, Student, StudentConfig
from distill.train import DistillObjective, TeacherTarget, make_batch
from features.core.config import from_dict
from features.core.errors import ConfigError


def test_geo_loss_zero_on_the_same_geometry():
    torch.manual_seed(0)
    c = torch.randn(7, 5)
    assert geo_loss(c, c, 0.1).item() == pytest.approx(0.0, abs=1e-6)
    # any rotation (and row scaling, and a wider space) keeps the cosines: still 0
    q, _ = torch.linalg.qr(torch.randn(8, 8))
    z = torch.cat([c, torch.zeros(7, 3)], 1) @ q * torch.rand(7, 1).add(0.5)
    assert geo_loss(z, c, 0.1).item() == pytest.approx(0.0, abs=1e-5)


def test_geo_loss_by_hand():
    # three items; content: 0 and 1 close, 2 orthogonal; student: all orthogonal
    c = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    z = torch.eye(3)
    t = 1.0
    # row 0: p = softmax([cos(c0,c1), cos(c0,c2)]) = softmax([1, 0]); q = softmax([0, 0]) = [.5, .5]
    p = math.e / (math.e + 1)
    kl01 = p * math.log(p / 0.5) + (1 - p) * math.log((1 - p) / 0.5)  # rows 0 and 1
    kl2 = 0.0  # row 2: p = softmax([0, 0]) = q
    assert geo_loss(z, c, t).item() == pytest.approx((2 * kl01 + kl2) / 3, rel=1e-5)


def test_geo_loss_positive_gradients_reach_z_only():
    torch.manual_seed(1)
    c = torch.randn(16, 12, requires_grad=True)
    z = torch.randn(16, 4, requires_grad=True)
    loss = geo_loss(z, c, 0.1)
    assert loss.item() > 0.01
    loss.backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    assert c.grad is None  # the content is a frozen target
    # a few steps of gradient descent on z move it towards the content geometry
    z2 = z.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([z2], lr=0.05)
    for _ in range(50):
        opt.zero_grad()
        geo_loss(z2, c, 0.1).backward()
        opt.step()
    assert geo_loss(z2, c, 0.1).item() < loss.item() / 2


def test_geo_loss_degenerate_batches():
    z = torch.randn(2, 3, requires_grad=True)
    out = geo_loss(z, torch.randn(2, 5), 0.1)  # each row has one neighbour: nothing to match
    assert out.item() == 0.0 and out.requires_grad


def _objective_inputs():
    torch.manual_seed(0)
    n = 12
    x = ContentTensors(
        text=torch.randn(n, 6),
        tokens=[torch.randint(1, 5, (n, 2))],
        numeric=torch.randn(n, 2),
        image=None,
        image_mask=None,
    )
    spec = ContentSpec.of(x, vocab_size=5)
    teachers = {"id2item": TeacherTarget(np.random.default_rng(0).normal(size=(n, 5)).astype(np.float32), np.ones(n, bool))}
    log_q = {"s2i": np.full(n, -math.log(n)), "i2i": np.full(n, -math.log(n))}
    hist = np.array([[0, 1, -1], [2, 3, 4], [5, -1, -1], [6, 7, 8]])
    batch = make_batch(hist, np.array([9, 10, 11, 0]), np.array([[1, 2], [3, 9], [4, 11]]))
    geo = np.random.default_rng(1).normal(size=(n, 7)).astype(np.float32)
    return x, spec, teachers, log_q, batch, geo


def _losses(cfg: DistillConfig, geo: np.ndarray | None) -> dict[str, torch.Tensor]:
    x, spec, teachers, log_q, batch, _ = _objective_inputs()
    torch.manual_seed(0)
    student = Student(StudentConfig(dim=8, hidden_dim=6, field_dim=3), spec, {"id2item": 5}, (4,))
    obj = DistillObjective(student, dataclasses.replace(cfg, id2i_teachers=("id2item",)), teachers, log_q, geo)
    obj.eval()  # no dropout: two builds give the same z
    return obj(x, batch)


def test_w_geo_zero_leaves_the_objective_unchanged():
    cfg = DistillConfig(w_geo=0.0, matryoshka_dims=(4,), student=StudentConfig(dim=8, hidden_dim=6, field_dim=3))
    *_, geo = _objective_inputs()
    plain, given = _losses(cfg, None), _losses(cfg, geo)  # content given but w_geo = 0: ignored
    assert "geo" not in plain and set(plain) == set(given)
    for k in plain:
        torch.testing.assert_close(plain[k], given[k])
    # off: the training key (hence the cached students) is the one from before L_geo existed
    key = DistillConfig(w_geo=0.0).training_key()
    assert "w_geo" not in key and "geo_temperature" not in key
    assert DistillConfig(w_geo=1.0).training_key()["w_geo"] == 1.0


def test_w_geo_adds_the_weighted_term():
    base = DistillConfig(w_geo=0.0, matryoshka_dims=(4,), student=StudentConfig(dim=8, hidden_dim=6, field_dim=3))
    *_, geo = _objective_inputs()
    off = _losses(base, None)
    on = _losses(dataclasses.replace(base, w_geo=2.0, geo_temperature=0.2), geo)
    assert on["geo"].item() > 0
    for k in ("s2i", "i2i", "id2i"):
        torch.testing.assert_close(on[k], off[k])
    torch.testing.assert_close(on["loss"], off["loss"] + 2.0 * on["geo"])
    on["loss"].backward()
    with pytest.raises(ValueError, match="geo_content"):
        _losses(dataclasses.replace(base, w_geo=1.0), None)


def test_geo_config_keys():
    assert DistillConfig().w_geo == 0.0  # off by default (see the key's comment for why)
    cfg = from_dict(DistillConfig, {"w_geo": 0.3, "geo_temperature": 0.05})
    assert cfg.w_geo == 0.3 and cfg.geo_temperature == 0.05
    assert cfg.two_tower_baseline().w_geo == 0.0  # the baseline stays L_s2i alone
    for bad, why in (({"w_geo": -1.0}, "weights"), ({"geo_temperature": 0.0}, "geo_temperature"), ({"geo_temperature": 2.0}, "geo_temperature")):
        with pytest.raises(ConfigError, match=why):
            from_dict(DistillConfig, bad)
