"""The ranker's history encoders start as the mean pool, and `history_mean`
gives the over-arch the mean encoder's own interaction (issue 14).

Defect these pin: with xavier W_Q, W_K, W_V the target-attention summary
started as mean @ W_V, a rotated, nearly rank-deficient projection (a random
16 x 16 W_V has singular values from ~2 down to ~0.02), so candidate *
summary lost the candidate-history dot product; on the long-history A/B the
full-history attention arm learned no more than the one truncated to 256
events. Likewise an over-arch given [candidate, mean] without their product
learned nothing from the mean in that budget.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recsys.data import synthetic_batch
from recsys.models.ranker import Ranker, RankerConfig, RankerTrain
from recsys.modules.reference_attention import TargetAttention, init_as_mean_pool_
from recsys.modules.svd_attention import SVDAttention, SVDAttentionConfig
from tests.recsys.test_ranker_model import SPEC, batch_of, model_for, small


def test_init_as_mean_pool_gives_the_masked_mean():
    """Every candidate's summary is the plain mean of its valid events; padding (even NaN) ignored."""
    g = torch.Generator().manual_seed(0)
    att = init_as_mean_pool_(TargetAttention(8).double())
    x = torch.randn(3, 7, 8, generator=g, dtype=torch.float64)
    lengths = torch.tensor([7, 3, 0])
    x[1, 3:] = float("nan")
    q = torch.randn(3, 4, 8, generator=g, dtype=torch.float64)
    out = att(x, lengths, q)
    valid = (torch.arange(7)[None, :] < lengths[:, None])[..., None]
    mean = torch.where(valid, x, 0.0).sum(1) / lengths.clamp_min(1)[:, None]
    torch.testing.assert_close(out, mean[:, None, :].expand_as(out))


def test_init_as_mean_pool_keeps_state_dict_compatible():
    """Same parameter names and shapes for TargetAttention and SVDAttention; nothing else added."""
    ref = init_as_mean_pool_(TargetAttention(8))
    svd = init_as_mean_pool_(SVDAttention(SVDAttentionConfig(dim=8, rank=4)))
    assert {k: v.shape for k, v in ref.state_dict().items()} == {k: v.shape for k, v in svd.state_dict().items()}
    svd.load_state_dict(ref.state_dict())
    torch.testing.assert_close(ref.w_v, torch.eye(8))
    assert not ref.w_k.any()


@pytest.mark.parametrize("encoder,kw", [("reference", {}), ("svd_truncated", {"svd_rank": 8})])
def test_attention_ranker_starts_as_the_mean_ranker(encoder, kw):
    """Same generator: exact target attention (and truncated SVD at R = D) gives the mean
    ranker's logits at init, so it can only start from what mean pooling starts from."""
    batch = batch_of([([1, 2, 3, 4, 9], [5, 6], 0), ([7, 8], [9, 10, 11], 1), ([], [12], 2)])
    mean = model_for(small(history_encoder="mean")).eval()
    att = model_for(small(history_encoder=encoder, **kw)).eval()
    with torch.no_grad():
        torch.testing.assert_close(att(batch).click, mean(batch).click, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("encoder", ["reference", "svd_truncated", "svd_compact"])
def test_encoder_init_draws_nothing_and_learns(encoder):
    """The encoder's init is deterministic (seed-independent), and its bilinear form is not a
    saddle: W_K gets a nonzero gradient at init."""
    a, b = model_for(small(history_encoder=encoder), seed=1), model_for(small(history_encoder=encoder), seed=2)
    for name, p in a.history_encoder.named_parameters():
        assert torch.equal(p, dict(b.history_encoder.named_parameters())[name]), name
    loss, _ = RankerTrain(a)(synthetic_batch(SPEC, 3, 9, 4, np.random.default_rng(1)))
    loss.backward()
    assert a.history_encoder.w_k.grad.abs().sum() > 0
    assert a.history_encoder.w_v.grad.abs().sum() > 0


def test_history_mean_passes_candidate_times_mean():
    """history_mean appends [mean, candidate * mean] to the over-arch input, like the mean encoder's block."""
    model = Ranker(small(history_encoder="svd_compact", history_mean=True), SPEC, None,
                   torch.Generator().manual_seed(0)).eval()
    seen = {}
    model.over_arch.register_forward_hook(lambda m, inp, out: seen.update(x=inp[0]))
    emb = {}
    model.item_embeddings.register_forward_hook(lambda m, inp, out: emb.update(out))
    batch = batch_of([([1, 2, 3], [5, 6], 0), ([7, 8], [9], 1)])
    with torch.no_grad():
        model(batch)
    d = 8
    cand = emb["cand_item"].values()
    hist = emb["hist_item"].values()
    mean = torch.stack([hist[:3].mean(0)] * 2 + [hist[3:].mean(0)])
    x = seen["x"]
    assert x.shape[1] == model.over_arch._mlp[0]._linear.in_features  # type: ignore[index]
    torch.testing.assert_close(x[:, 3 * d:4 * d], mean)
    torch.testing.assert_close(x[:, 4 * d:5 * d], cand * mean)
