"""Losses on tiny cases computed by hand (tau = 1 unless said otherwise)."""

from __future__ import annotations

import math

import pytest
import torch

from distill.losses import Temperature, cosine_distill, i2i_loss, id2i_loss, info_nce, negative_bias, s2i_loss

E = torch.eye(2)  # two orthogonal unit vectors
L1 = math.log(1 + math.exp(-1))  # -log(e^1 / (e^1 + e^0)): right item at cos 1, wrong at cos 0


def test_info_nce_orthogonal_pair():
    assert info_nce(E, E, 1.0).item() == pytest.approx(L1)
    # inputs are normalised: scale does not matter
    assert info_nce(E * torch.tensor([[2.0], [3.0]]), E * 5, 1.0).item() == pytest.approx(L1)
    # tau = 0.5 doubles the logits: log(1 + e^-2)
    assert info_nce(E, E, 0.5).item() == pytest.approx(math.log(1 + math.exp(-2)))


def test_info_nce_same_target_is_not_a_negative():
    # both rows target item 7: the other row is masked out, each row's softmax has one entry
    assert info_nce(E, E, 1.0, target_ids=torch.tensor([7, 7])).item() == pytest.approx(0.0)
    # distinct items: unchanged
    assert info_nce(E, E, 1.0, target_ids=torch.tensor([7, 8])).item() == pytest.approx(L1)


def test_info_nce_logq_correction():
    q = torch.tensor([0.5, 0.25])
    log_q = q.log()
    # logits_ij = cos_ij - log q_j
    # row 0: [1 - log .5, 0 - log .25] -> loss log(1 + e^{(0 - log .25) - (1 - log .5)})
    r0 = math.log(1 + math.exp(-math.log(0.25) - 1 + math.log(0.5)))
    # row 1: [0 - log .5, 1 - log .25] -> loss log(1 + e^{(0 - log .5) - (1 - log .25)})
    r1 = math.log(1 + math.exp(-math.log(0.5) - 1 + math.log(0.25)))
    assert info_nce(E, E, 1.0, log_q=log_q).item() == pytest.approx((r0 + r1) / 2)
    bias = negative_bias(2, torch.tensor([3, 3]), log_q)
    assert bias[0, 1] == float("-inf") and bias[0, 0] == pytest.approx(-math.log(0.5))


def test_s2i_loss_mean_pooled_query_and_padding():
    hist = torch.tensor([[[1.0, 0.0], [3.0, 0.0]], [[0.0, 2.0], [9.0, 9.0]]])  # (B=2, L=2, D=2)
    mask = torch.tensor([[1, 1], [1, 0]])  # user 1's second entry is padding
    target = E.clone()
    # queries: [1, 0] and [0, 1] (padding ignored) -> the orthogonal case
    assert s2i_loss(hist, mask, target, 1.0).item() == pytest.approx(L1)
    # matryoshka prefix d=1: queries [1] and [0] (zero), targets [1] and [0]
    # row 0: logits [1, 0] -> L1; row 1: logits [0, 0] -> log 2; averaged with the full-D loss
    got = s2i_loss(hist, mask, target, 1.0, dims=(1,)).item()
    assert got == pytest.approx(((L1 + math.log(2)) / 2 + L1) / 2)


def test_i2i_loss_pairs():
    assert i2i_loss(E, E, 1.0).item() == pytest.approx(L1)
    # swapped partners: each a_i is orthogonal to its b_i -> loss log(1 + e^{1})
    assert i2i_loss(E, E.flip(0), 1.0).item() == pytest.approx(math.log(1 + math.e))


def test_id2i_cosine_distill_and_stopgrad():
    pred = torch.tensor([[1.0, 0.0], [1.0, 1.0]], requires_grad=True)
    target = torch.tensor([[1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    # 1 - cos: 0 and 1 - 1/sqrt(2)
    want = (0 + 1 - 1 / math.sqrt(2)) / 2
    assert cosine_distill(pred, target).item() == pytest.approx(want)
    assert cosine_distill(pred, target, torch.tensor([True, False])).item() == pytest.approx(0.0)
    # the mean runs over the set rows only (a mutation audit: dividing by all rows passed)
    assert cosine_distill(pred, target, torch.tensor([False, True])).item() == pytest.approx(1 - 1 / math.sqrt(2))
    none = cosine_distill(pred, target, torch.tensor([False, False]))
    assert none.item() == 0.0 and none.requires_grad
    loss = id2i_loss([pred, pred], [target, target], [None, None])  # sum over two teachers
    assert loss.item() == pytest.approx(2 * want)
    loss.backward()
    assert target.grad is None  # the teacher is frozen (stop-gradient)
    assert pred.grad is not None and pred.grad.abs().sum() > 0
    with pytest.raises(ValueError):
        id2i_loss([], [], [])


def test_temperature_is_learnable_and_clamped():
    t = Temperature(0.07)
    assert t().item() == pytest.approx(0.07, rel=1e-5)
    info_nce(torch.randn(4, 3), torch.randn(4, 3), t()).backward()
    assert t.log_tau.grad is not None and t.log_tau.grad != 0
    with torch.no_grad():
        t.log_tau.fill_(10.0)
    assert t().item() == pytest.approx(1.0)
    with pytest.raises(ValueError):
        Temperature(2.0)
