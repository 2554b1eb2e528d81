"""recsys.models.ranker: shapes, every history encoder, padding masked, gradients
reach the tables, multi-task loss masking, config validation."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

from features.core.config import from_dict
from features.core.errors import ConfigError
from recsys.data import CAND_KEY, HIST_KEY, FeatureSpec, build_batch, synthetic_batch
from recsys.models.ranker import (
    HISTORY_ENCODERS,
    Ranker,
    RankerConfig,
    RankerTrain,
    make_history_encoder,
)

SPEC = FeatureSpec(
    n_items=60,
    n_users=12,
    user_fields=(("user", 12), ("user_gender", 2)),
    item_fields=(("item_genres", 5),),
    dense_names=("a", "b", "c"),
)


def small(**kw) -> RankerConfig:
    base = dict(embedding_dim=8, svd_rank=4, dense_arch_layer_sizes=(8,), over_arch_layer_sizes=(16, 8))
    return RankerConfig(**(base | kw))


def model_for(cfg: RankerConfig, seed: int = 0, embeddings: torch.Tensor | None = None) -> Ranker:
    return Ranker(cfg, SPEC, embeddings, torch.Generator().manual_seed(seed))


def batch_of(requests: list[tuple], seed: int = 0):
    """Batch of (history items, candidate items, user) requests, built by hand."""
    rng = np.random.default_rng(seed)
    hist = np.array([i for h, _, _ in requests for i in h], dtype=np.int64)
    cands = np.array([i for _, c, _ in requests for i in c], dtype=np.int64)
    users = np.array([u for _, _, u in requests], dtype=np.int64)
    n, b = len(cands), len(requests)
    genres_len = (cands % 3).astype(np.int64)
    genres = (np.repeat(cands, genres_len) % 5).astype(np.int64)
    dense = np.stack([np.sin(cands), np.cos(cands), cands / 60.0], axis=1)
    return build_batch(
        hist_items=hist,
        hist_lengths=np.array([len(h) for h, _, _ in requests]),
        cand_items=cands,
        cand_lengths=np.array([len(c) for _, c, _ in requests]),
        user_sparse={"user": (users, np.ones(b, np.int64)), "user_gender": (users % 2, np.ones(b, np.int64))},
        item_sparse={"item_genres": (genres, genres_len)},
        dense=dense,
        labels=((rng.random(n) < 0.5).astype(np.float32), (rng.random(n) < 0.5).astype(np.float32), rng.random(n) < 0.7),
    )


@pytest.mark.parametrize("encoder", HISTORY_ENCODERS)
@pytest.mark.parametrize("over_arch", ["mlp", "dcn"])
def test_forward_shapes_every_encoder(encoder, over_arch):
    model = model_for(small(history_encoder=encoder, over_arch=over_arch))
    batch = synthetic_batch(SPEC, 3, 9, 4, np.random.default_rng(1))
    out = model(batch)
    assert out.click.shape == (12,) and out.lt.shape == (12,)
    assert torch.isfinite(out.click).all() and torch.isfinite(out.lt).all()
    loss, parts = RankerTrain(model)(batch)
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert parts.logits.click.shape == (12,)


@pytest.mark.parametrize("encoder", HISTORY_ENCODERS)
def test_jagged_batch_with_empty_history_and_varying_candidates(encoder):
    model = model_for(small(history_encoder=encoder))
    batch = batch_of([([], [1, 2], 0), ([5, 6, 7, 8, 9], [3], 1), ([4], [10, 11, 12], 2)])
    out = model(batch)
    assert out.click.shape == (6,) and torch.isfinite(out.click).all()


@pytest.mark.parametrize("encoder", HISTORY_ENCODERS)
def test_a_batch_of_empty_histories_scores_as_in_a_mixed_batch(encoder):
    """A probe (2026-12-01): every attention encoder raised "cannot reshape
    tensor of 0 elements" on a batch where no request had a history (a new
    user's first request, served alone)."""
    model = model_for(small(history_encoder=encoder)).eval()
    new = ([], [1, 2], 0)
    with torch.no_grad():
        alone = model(batch_of([new]))
        both = model(batch_of([new, ([], [4], 2)]))
        mixed = model(batch_of([new, ([5, 6, 7], [3], 1)]))
    assert torch.isfinite(alone.click).all() and torch.isfinite(alone.lt).all()
    torch.testing.assert_close(both.click[:2], alone.click, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mixed.click[:2], alone.click, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mixed.lt[:2], alone.lt, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("encoder", HISTORY_ENCODERS)
def test_padding_masked_in_ranker(encoder):
    """A request's logits do not depend on the padding its batch needs: batched
    alone vs. next to a request with a much longer history / more candidates."""
    model = model_for(small(history_encoder=encoder)).eval()
    a = ([3, 9, 14, 9], [1, 2, 5], 4)
    other = (list(range(10, 50)), list(range(20, 31)), 7)
    with torch.no_grad():
        alone = model(batch_of([a]))
        together = model(batch_of([a, other]))
        together_rev = model(batch_of([other, a]))
    torch.testing.assert_close(together.click[:3], alone.click, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(together_rev.click[11:], alone.click, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(together.lt[:3], alone.lt, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("encoder", [e for e in HISTORY_ENCODERS if e != "mean"])
def test_encoders_ignore_padding_content(encoder):
    """Encoder modules: garbage (even NaN) in padded positions changes nothing."""
    torch.manual_seed(0)
    enc = make_history_encoder(small(history_encoder=encoder)).double()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 6, 8, generator=g, dtype=torch.float64)
    q = torch.randn(2, 3, 8, generator=g, dtype=torch.float64)
    lengths = torch.tensor([4, 0])
    padded = torch.cat([x, torch.randn(2, 5, 8, generator=g, dtype=torch.float64)], dim=1)
    padded[0, 4:] = float("nan")
    padded[1, :] = 1e6
    out = enc(x, lengths, q)
    out_padded = enc(padded, lengths, q)
    torch.testing.assert_close(out_padded, out)
    assert torch.equal(out[1], torch.zeros_like(out[1]))  # empty history -> zeros


@pytest.mark.parametrize("kw", [{"lt_tower": "shared"}, {"history_mean": True, "history_encoder": "svd_compact"},
                                {"history_mean": True, "history_encoder": "mean"}])
def test_optional_towers(kw):
    model = model_for(small(**kw))
    batch = synthetic_batch(SPEC, 2, 5, 3, np.random.default_rng(0))
    loss, _ = RankerTrain(model)(batch)
    loss.backward()
    assert (model.lt_tower is None) == (kw.get("lt_tower") == "shared")


def test_lt_tower_sees_no_ids():
    """Default LT tower: the LT logit depends on dense features only."""
    model = model_for(small()).eval()
    a = synthetic_batch(SPEC, 2, 5, 3, np.random.default_rng(0))
    b = synthetic_batch(SPEC, 2, 5, 3, np.random.default_rng(1))
    b.dense = a.dense
    with torch.no_grad():
        torch.testing.assert_close(model(a).lt, model(b).lt)
        assert not torch.allclose(model(a).click, model(b).click)


@pytest.mark.parametrize("encoder", HISTORY_ENCODERS)
def test_gradients_reach_embedding_tables(encoder):
    model = model_for(small(history_encoder=encoder, use_user_id=True))
    hist_only, cand_only = [40, 41, 42], [50, 51]
    batch = batch_of([(hist_only, cand_only, 2), ([43, 40], [52], 5)])
    loss, _ = RankerTrain(model)(batch)
    loss.backward()
    item = model.item_embeddings.embeddings["item"].weight.grad
    for row in hist_only + cand_only + [43, 52]:
        assert item[row].abs().sum() > 0, f"item row {row} got no gradient"
    assert item[0].abs().sum() == 0  # unused rows untouched
    users = model.user_embeddings.embedding_bags["user"].weight.grad
    assert users[2].abs().sum() > 0 and users[5].abs().sum() > 0
    assert model.item_features.embedding_bags["item_genres"].weight.grad.abs().sum() > 0
    if model.history_encoder is not None:  # "mean" has no module: a segment mean in the ranker
        assert all(p.grad is not None for p in model.history_encoder.parameters())


def test_candidate_and_history_share_one_table():
    model = model_for(small())
    tables = model.item_embeddings.embedding_configs()
    assert len(tables) == 1 and tables[0].feature_names == [HIST_KEY, CAND_KEY]


def test_svd_truncated_full_rank_equals_reference():
    """SVD "truncated" (formerly "exact") with R = D is the reference target attention (same weights)."""
    ref = model_for(small(history_encoder="reference")).eval()
    svd = model_for(small(history_encoder="svd_truncated", svd_rank=8)).eval()
    svd.load_state_dict(ref.state_dict())
    batch = batch_of([([1, 2, 3, 4], [5, 6], 0), ([7, 8], [9], 1)])
    with torch.no_grad():
        torch.testing.assert_close(svd(batch).click, ref(batch).click, rtol=1e-4, atol=1e-5)


def test_lt_loss_only_on_masked_rows():
    model = model_for(small(lt_weight=1.0)).eval()
    batch = batch_of([([1, 2], [3, 4, 5], 0), ([6], [7, 8], 1)])
    _, parts1 = RankerTrain(model)(batch)
    flipped = batch.lt_labels.clone()
    flipped[~batch.lt_mask] = 1 - flipped[~batch.lt_mask]
    batch.lt_labels = flipped
    _, parts2 = RankerTrain(model)(batch)
    torch.testing.assert_close(parts1.lt_loss, parts2.lt_loss)
    batch.lt_mask = torch.zeros_like(batch.lt_mask)
    loss3, parts = RankerTrain(model)(batch)
    assert float(parts.lt_loss) == 0.0


def test_same_generator_same_weights():
    a, b = model_for(small(), seed=5), model_for(small(), seed=5)
    c = model_for(small(), seed=6)
    for (k, va), vb, vc in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values()):
        assert torch.equal(va, vb), k
    assert any(not torch.equal(va, vc) for va, vc in zip(a.state_dict().values(), c.state_dict().values()))


def test_distilled_embeddings_init_and_concat():
    emb = torch.randn(SPEC.n_items, 20, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="needs item embeddings"):
        model_for(small(use_distilled_embeddings="concat"))
    init = model_for(small(use_distilled_embeddings="init"), embeddings=emb)
    w = init.item_embeddings.embeddings["item"].weight.detach()
    # PCA init: the table spans the top principal directions of the distilled vectors
    centered = emb - emb.mean(0)
    basis = torch.linalg.svd(centered, full_matrices=False)[0][:, :8]
    resid = w - basis @ (basis.T @ w)
    assert resid.norm() / w.norm() < 1e-4
    concat = model_for(small(use_distilled_embeddings="concat"), embeddings=emb)
    assert "distilled" not in concat.state_dict()
    assert all(p.data_ptr() != concat.distilled.data_ptr() for p in concat.parameters())
    batch = synthetic_batch(SPEC, 2, 4, 3, np.random.default_rng(0))
    loss, _ = RankerTrain(concat)(batch)
    loss.backward()
    assert concat.learned_projection.weight.grad.abs().sum() > 0
    assert concat.distilled_projection.weight.grad.abs().sum() > 0
    assert concat.distilled.grad is None
    # the file's scale does not matter: the frozen table is L2-normalised (found by a probe: raw x100 vectors
    # took test logloss from 0.66 to 3.2)
    scaled = model_for(small(use_distilled_embeddings="concat"), embeddings=emb * 100)
    with torch.no_grad():
        torch.testing.assert_close(scaled.eval()(batch).click, concat.eval()(batch).click)
    torch.testing.assert_close(concat.distilled.norm(dim=1), torch.ones(SPEC.n_items))


def test_use_user_id_off_drops_the_user_table():
    model = model_for(small(use_user_id=False))
    assert "user" not in model.user_keys and "user_gender" in model.user_keys
    assert "user" in model_for(small(use_user_id=True)).user_keys
    out = model(synthetic_batch(SPEC, 2, 3, 2, np.random.default_rng(0)))
    assert out.click.shape == (4,)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"svd_rank": 9, "embedding_dim": 8, "history_encoder": "svd_compact"}, "svd_rank"),
        ({"embedding_dim": 0}, "embedding_dim"),
        ({"embedding_dim": -4}, "embedding_dim"),
        ({"history_encoder": "lstm"}, "history_encoder"),
        ({"over_arch": "transformer"}, "over_arch"),
        ({"use_distilled_embeddings": "yes"}, "use_distilled_embeddings"),
        ({"over_arch_layer_sizes": ()}, "over_arch_layer_sizes"),
        ({"dense_arch_layer_sizes": (8, 0)}, "dense_arch_layer_sizes"),
        ({"click_weight": 0.0, "lt_weight": 0.0}, "weight"),
        ({"click_weight": 0.0}, "click_weight must be > 0"),  # an untrained head's metrics were reported
        ({"lt_weight": 0.0}, "lt_weight must be > 0"),
        ({"lt_tower": "tower"}, "lt_tower"),
    ],
)
def test_config_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        RankerConfig(**kw)
    data = {k: list(v) if isinstance(v, tuple) else v for k, v in kw.items()}
    with pytest.raises(ConfigError, match=match):
        from_dict(RankerConfig, data, where="ranker")


def test_constructors_take_at_most_five_arguments():
    for cls in (Ranker, RankerTrain):
        params = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
        assert len(params) <= 5, cls


@pytest.mark.parametrize("gram", ["float64", "input"])
def test_compact_reads_long_histories_jagged_with_the_padded_numbers(monkeypatch, gram):
    """Long histories take SVDAttention.forward_jagged (no padded copy); the
    logits and every gradient equal the padded path's."""
    from recsys.models import ranker as ranker_mod
    from recsys.modules.svd_attention import SVDAttention

    rng = np.random.default_rng(5)
    requests = [(list(rng.integers(0, 60, n)), list(rng.integers(0, 60, c)), u)
                for u, (n, c) in enumerate([(40, 3), (0, 2), (25, 5), (33, 1)])]
    batch = batch_of(requests)
    calls = []
    real = SVDAttention.forward_jagged
    monkeypatch.setattr(SVDAttention, "forward_jagged", lambda self, *a: calls.append(1) or real(self, *a))

    def run(threshold):
        monkeypatch.setattr(ranker_mod, "JAGGED_MIN_MEAN_LENGTH", threshold)
        model = model_for(small(history_encoder="svd_compact", history_mean=True, svd_gram_dtype=gram))
        loss, parts = RankerTrain(model)(batch)
        loss.backward()
        return parts.logits.click, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    padded_logits, padded_grads = run(10**9)
    assert not calls
    jagged_logits, jagged_grads = run(20)  # mean length 24.5 >= 20
    assert calls
    torch.testing.assert_close(jagged_logits, padded_logits, rtol=1e-5, atol=1e-6)
    assert padded_grads.keys() == jagged_grads.keys()
    for name, grad in padded_grads.items():
        torch.testing.assert_close(jagged_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_row_chunks_stay_within_the_budget_and_cover_every_row():
    from recsys.models.ranker import row_chunks

    rng = np.random.default_rng(3)
    hist, cand = rng.integers(0, 200, 300).tolist(), rng.integers(1, 9, 300).tolist()
    chunks = row_chunks(hist, cand, 5000)
    assert chunks[0][0] == 0 and chunks[-1][1] == 300
    assert all(e == s2 for (_, e), (s2, _) in zip(chunks, chunks[1:]))
    for s, e in chunks:
        assert e - s == 1 or (e - s) * max(hist[s:e]) * max(cand[s:e]) <= 5000
    assert row_chunks([10**6], [50], 10) == [(0, 1)]  # a row alone may exceed it
    assert row_chunks([], [], 10) == [(0, 0)]


@pytest.mark.parametrize("encoder", ["reference", "svd_truncated"])
def test_encoders_with_per_event_logits_run_large_batches_in_chunks(monkeypatch, encoder):
    """A batch whose (B, C, L) logits exceed the budget runs in row chunks (the
    default eval batch over 10k-event histories asked for GBs at once); logits
    and gradients equal the one-piece forward's."""
    from recsys.models import ranker as ranker_mod

    rng = np.random.default_rng(7)
    requests = [(list(rng.integers(0, 60, n)), list(rng.integers(0, 60, c)), u)
                for u, (n, c) in enumerate([(40, 3), (0, 2), (25, 5), (33, 1), (7, 4), (12, 6)])]
    batch = batch_of(requests)
    shapes = []
    attend = ranker_mod.Ranker._attend_padded
    monkeypatch.setattr(ranker_mod.Ranker, "_attend_padded",
                        lambda self, h, hl, c, cl: shapes.append(len(hl)) or attend(self, h, hl, c, cl))

    def run(budget):
        monkeypatch.setattr(ranker_mod, "LOGITS_BUDGET", budget)
        shapes.clear()
        model = model_for(small(history_encoder=encoder, svd_rank=3))
        loss, parts = RankerTrain(model)(batch)
        loss.backward()
        return parts.logits.click, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    whole_logits, whole_grads = run(10**9)
    assert shapes == [6]
    chunked_logits, chunked_grads = run(200)
    assert len(shapes) > 2 and sum(shapes) == 6
    torch.testing.assert_close(chunked_logits, whole_logits, rtol=1e-5, atol=1e-6)
    for name, grad in whole_grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
