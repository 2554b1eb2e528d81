"""Serving state of compact SVD-attention: factor cache, windowed incremental state,
and agreement with the batch forward (and the ranker's history encoder) on the same window."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from recsys.models.ranker import RankerConfig, make_history_encoder
from recsys.modules import svd_attention as svd_mod
from recsys.modules.svd_attention import SVDAttention, SVDAttentionConfig
from recsys.modules.svd_serving import FactorCache, IncrementalSVDState, forward_from_state, history_fingerprint


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def module(d: int, rank: int, g: torch.Generator, dtype=torch.float64, **kw) -> SVDAttention:
    m = SVDAttention(SVDAttentionConfig(dim=d, rank=rank, **kw)).to(dtype)
    with torch.no_grad():
        for w in (m.w_q, m.w_k, m.w_v):
            w.copy_(torch.randn(d, d, generator=g, dtype=torch.float64).to(dtype) / math.sqrt(d))
    return m


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**31 - 1),
    total=st.integers(0, 40),
    window=st.integers(1, 15),
    d=st.integers(2, 6),
    rank_frac=st.floats(0.0, 1.0),
    chunks=st.integers(1, 5),
    normalize=st.booleans(),
)
def test_windowed_state_equals_batch_forward_on_the_window(seed, total, window, d, rank_frac, chunks, normalize):
    g = torch.Generator().manual_seed(seed)
    rank = 1 + int(rank_frac * (d - 1))
    events = torch.randn(total, d, generator=g, dtype=torch.float64)
    state = IncrementalSVDState(d, window, gram_dtype="float64", dtype=torch.float64)
    cuts = sorted(torch.randint(0, total + 1, (chunks - 1,), generator=g).tolist())
    for lo, hi in zip([0, *cuts], [*cuts, total]):
        state.append(events[lo:hi])  # includes empty chunks and chunks longer than the window
    kept = events[max(0, total - window) :]  # (W', D): the last `window` events
    assert state.count == total and state.length == kept.shape[0]
    assert torch.equal(state.events(), kept)
    assert torch.allclose(state.gram, kept.mT @ kept, rtol=1e-10, atol=1e-10)
    m = module(d, rank, g, normalize_tokens=normalize)
    q = torch.randn(1, 3, d, generator=g, dtype=torch.float64, requires_grad=True)
    batch = m(kept[None], torch.tensor([kept.shape[0]]), q)
    served = forward_from_state(m, [state], q)
    # summed vs one-GEMM Grams differ by rounding; a zero singular value sits at that noise
    # (~1e-8 s_1) and, at R = D, enters M with weight 1: ~1e-8 of the output
    assert rel(served, batch) <= 1e-7
    (g_served,), (g_batch,) = torch.autograd.grad(served.sum(), [q]), torch.autograd.grad(batch.sum(), [q])
    assert rel(g_served, g_batch) <= 1e-7


def test_state_honours_gram_dtype_and_keeps_a_fixed_dtype():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(300, 16, generator=g)
    fast = IncrementalSVDState(16, 200)  # "auto" = "input": float32 sums, like the batch path under no_grad
    exact = IncrementalSVDState(16, 200, gram_dtype="float64")
    assert fast.gram_dtype == "input" and fast.gram.dtype == torch.float32 and exact.gram.dtype == torch.float64
    fast.append(x[:100].double())  # float64 events are cast to the state's dtype, never adopted
    fast.append(x[100:])
    exact.append(x)
    assert fast.dtype == exact.dtype == torch.float32 and fast.gram.dtype == torch.float32
    kept = x[100:].double()
    assert rel(fast.gram, kept.mT @ kept) <= 1e-6 and rel(exact.gram, kept.mT @ kept) <= 1e-12
    with pytest.raises(ValueError, match="window"):
        IncrementalSVDState(16, 0)
    with pytest.raises(ValueError, match="gram_dtype"):
        IncrementalSVDState(16, 10, gram_dtype="float16")
    with pytest.raises(ValueError, match=r"\(n, 16\)"):
        fast.append(torch.randn(2, 5))


def test_float32_down_dates_do_not_drift():
    # 20 windows of single-event appends with float32 sums: the periodic refresh bounds the drift
    g = torch.Generator().manual_seed(2)
    state = IncrementalSVDState(8, 50, gram_dtype="input")
    x = torch.randn(1000, 8, generator=g) * 10
    for row in x:
        state.append(row)
    kept = x[-50:].double()
    assert rel(state.gram, kept.mT @ kept) <= 1e-6


def test_a_large_event_leaving_the_window_does_not_leave_its_rounding_behind():
    """A probe (2026-12-01): one event 1e4 times the others, once down-dated
    from a float32 Gram, left 50% relative error in G (71% in the output)
    until the periodic refresh, up to W appends later."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(200, 8, generator=g)
    x[30] *= 1e4
    state = IncrementalSVDState(8, 50, gram_dtype="input")
    for i, row in enumerate(x):
        state.append(row)
        if 81 <= i <= 120:  # the big event (row 30) left the window at row 80
            kept = x[i - 49 : i + 1].double()
            assert rel(state.gram, kept.mT @ kept) <= 1e-5, i


def test_non_finite_events_are_refused_and_leave_the_state_as_it_was():
    g = torch.Generator().manual_seed(8)
    state = IncrementalSVDState(4, 10).append(torch.randn(6, 4, generator=g))
    before, count = state.gram.clone(), state.count
    bad = torch.randn(3, 4, generator=g)
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or inf values \(rows \[1\]"):
        state.append(bad)
    assert torch.equal(state.gram, before) and state.count == count


@pytest.mark.parametrize("gram", ["auto", "float64"])
def test_ranker_encoder_batch_forward_and_state_agree_on_the_same_window(gram):
    """The data layer keeps the last `history_cap` events; a state with window = history_cap serves the same."""
    history_cap = 20  # DataConfig.history_cap: the window the ranker's encoder sees
    cfg = RankerConfig(embedding_dim=8, svd_rank=4, history_encoder="svd_compact")
    att = make_history_encoder(cfg)
    assert isinstance(att, SVDAttention)
    assert att.config.mode == "compact" and att.config.normalize_tokens == cfg.svd_normalize_tokens
    g = torch.Generator().manual_seed(3)
    history = torch.randn(75, 8, generator=g)  # float32, longer than the cap
    queries = torch.randn(1, 6, 8, generator=g)
    state = IncrementalSVDState(8, window=history_cap, gram_dtype=gram)
    for i in range(0, 75, 7):
        state.append(history[i : i + 7])
    window = history[-history_cap:][None]  # (1, 20, 8): what the data layer hands the ranker
    with torch.no_grad():
        batch = att(window, torch.tensor([history_cap]), queries)
        served = forward_from_state(att, [state], queries)
    assert rel(served, batch) <= 1e-4  # float32 Gram on both sides ("auto" under no_grad); float32 rounding only


def test_serving_rejects_truncated_mode_and_mismatched_batches():
    g = torch.Generator().manual_seed(5)
    state = IncrementalSVDState(4, 10).append(torch.randn(12, 4, generator=g))
    with pytest.raises(ValueError, match="compact"):
        forward_from_state(module(4, 2, g, mode="truncated"), state, torch.randn(1, 3, 4))
    with pytest.raises(ValueError, match="2 states"):
        forward_from_state(module(4, 2, g), [state, state], torch.randn(1, 3, 4, dtype=torch.float64))
    empty = forward_from_state(module(4, 2, g), [IncrementalSVDState(4, 10)], torch.randn(1, 3, 4, dtype=torch.float64))
    assert torch.all(empty == 0)
    # no request at all, and queries of the wrong width (a raw RuntimeError before 2026-12-01)
    assert forward_from_state(module(4, 2, g), [], torch.randn(0, 3, 4)).shape == (0, 3, 4)
    with pytest.raises(ValueError, match=r"queries must be \(B, C, 4\)"):
        forward_from_state(module(4, 2, g), state, torch.randn(1, 3, 5))


# --------------------------------------------------------------------------- factor cache


def test_factor_cache_hit_does_not_recompute(monkeypatch):
    calls = []
    real = svd_mod.svd_factors

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    import recsys.modules.svd_serving as serving

    monkeypatch.setattr(serving, "svd_factors", counting)
    g = torch.Generator().manual_seed(9)
    d, rank = 6, 3
    x = torch.randn(2, 10, d, generator=g, dtype=torch.float64)
    lengths = torch.tensor([10, 7])
    q = torch.randn(2, 4, d, generator=g, dtype=torch.float64)
    cache = FactorCache(max_entries=8)
    fps = [history_fingerprint(x[i], int(lengths[i])) for i in range(2)]
    first = cache.get_batch(["u0", "u1"], fps, x, lengths, rank)
    assert (len(calls), cache.misses, cache.hits) == (2, 2, 0)
    second = cache.get_batch(["u0", "u1"], fps, x, lengths, rank)
    assert (len(calls), cache.misses, cache.hits) == (2, 2, 2)
    assert torch.equal(first.S, second.S) and torch.equal(first.V_all, second.V_all)
    for mode, normalize in (("truncated", False), ("compact", False), ("compact", True)):
        m = module(d, rank, g, mode=mode, normalize_tokens=normalize, gram_dtype="float64")
        assert rel(m(x, lengths, q, second), m(x, lengths, q)) <= 1e-8, mode
    x2 = x.clone()
    x2[1, 7] = torch.randn(d, generator=g, dtype=torch.float64)
    assert history_fingerprint(x2[1], 7) == fps[1] and history_fingerprint(x2[1], 8) != fps[1]
    cache.get("u1", history_fingerprint(x2[1], 8), x2[1], 8, rank)
    cache.get("u1", history_fingerprint(x2[1], 8), x2[1], 8, rank - 1)
    assert len(calls) == 4
    slim = FactorCache(keep_u=False).get_batch(["u0", "u1"], fps, x, lengths, rank)
    assert slim.U is None
    m = module(d, rank, g, mode="truncated", gram_dtype="float64")
    assert rel(m(x, lengths, q, slim), m(x, lengths, q)) <= 1e-8


def test_factor_cache_evicts_least_recently_used():
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(2))
    cache = FactorCache(max_entries=2)
    for key in ("a", "b", "a", "c"):
        cache.get(key, 1, x, 5, 2)
    assert len(cache) == 2 and cache.misses == 3 and cache.hits == 1
    cache.get("b", 1, x, 5, 2)
    assert cache.misses == 4


def test_ranker_refuses_the_old_encoder_name_and_truncated_matches_reference_below_full_rank():
    with pytest.raises(ValueError, match="'svd_exact' was renamed 'svd_truncated'"):
        RankerConfig(embedding_dim=8, svd_rank=4, history_encoder="svd_exact")
    # R = 4 < D = 8 through the factorisation: histories of <= 4 events have rank <= R, so truncated is exact
    cfg = RankerConfig(embedding_dim=8, svd_rank=4, history_encoder="svd_truncated")
    att = make_history_encoder(cfg).double()
    assert isinstance(att, SVDAttention) and att.config.mode == "truncated"
    from recsys.modules.reference_attention import reference_target_attention

    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 4, 8, generator=g, dtype=torch.float64, requires_grad=True)
    q = torch.randn(3, 5, 8, generator=g, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([4, 2, 3])
    out, ref = att(x, lengths, q), reference_target_attention(x, lengths, q, att.w_q, att.w_k, att.w_v)
    assert rel(out, ref) <= 1e-10
    cot = torch.randn(out.shape, generator=g, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad(out, [q, att.w_q, att.w_k, att.w_v], cot),
                    torch.autograd.grad(ref, [q, att.w_q, att.w_k, att.w_v], cot)):
        assert rel(a, b) <= 1e-8


@pytest.mark.parametrize("gram", ["auto", "float64", "input"])
def test_ranker_svd_gram_dtype_reaches_the_encoder(gram):
    """`ranker.svd_gram_dtype` is the module's gram_dtype: "input" trains on the float32 Gram."""
    from recsys.config.sections import SVD_GRAM_DTYPES
    from recsys.modules.svd_kernels import GRAM_DTYPES

    assert SVD_GRAM_DTYPES == GRAM_DTYPES  # the config's choices are the kernels' own
    for encoder in ("svd_compact", "svd_truncated"):
        att = make_history_encoder(RankerConfig(embedding_dim=8, svd_rank=4, history_encoder=encoder, svd_gram_dtype=gram))
        assert att.config.gram_dtype == gram
    with pytest.raises(ValueError, match="svd_gram_dtype must be one of"):
        RankerConfig(svd_gram_dtype="float16")
