"""SVD-attention vs its reference twins: outputs AND gradients, padding, signs, edge cases.

Inputs are drawn fresh from a torch.Generator seeded by hypothesis (never
zeros). Relative errors are norm-wise: ||a - b|| / ||b||.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from recsys.bench import attention as bench
from recsys.modules import reference_attention as ref_mod
from recsys.modules import svd_attention as svd_mod
from recsys.modules.reference_attention import (
    TargetAttention,
    reference_compact_attention,
    reference_target_attention,
    reference_truncated_attention,
)
from recsys.modules.svd_attention import (
    FactorCache,
    IncrementalSVDState,
    SVDAttention,
    SVDAttentionConfig,
    SVDFactors,
    history_fingerprint,
    svd_factors,
)

FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TOL = {torch.float64: 1e-5, torch.float32: 1e-4}
# (mode, normalize_tokens, gram_dtype)
MODES = [("exact", False, "float64"), ("compact", False, "float64"), ("compact", True, "float64"), ("compact", False, "input")]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30)) if b.norm() > 0 else float((a - b).norm())


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(g: torch.Generator, *shape: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def make_module(
    dim: int, rank: int, mode: str, g: torch.Generator, dtype=torch.float64, normalize=False, gram="float64"
) -> SVDAttention:
    """Module with projections drawn from `g` (not the global RNG), in `dtype`."""
    config = SVDAttentionConfig(dim=dim, rank=rank, mode=mode, normalize_tokens=normalize, gram_dtype=gram)
    m = SVDAttention(config).to(dtype)
    with torch.no_grad():
        for w in (m.w_q, m.w_k, m.w_v):
            w.copy_(randn(g, dim, dim, dtype=dtype) / math.sqrt(dim))
    return m


def weights(m: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return m.w_q, m.w_k, m.w_v


def grads(out: torch.Tensor, cot: torch.Tensor, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    return list(torch.autograd.grad(out, inputs, grad_outputs=cot, allow_unused=False))


def low_rank_history(g, b, length, k, d, dtype):
    """X = A @ M per user with inner dim k (true rank <= k); also returns A."""
    a = randn(g, b, length, k)  # (B, L, k)
    x = a @ randn(g, b, k, d)  # (B, L, D)
    return x.to(dtype), a


def random_lengths(g, b, length, allow_empty=True):
    lo = 0 if allow_empty else 1
    lengths = torch.randint(lo, length + 1, (b,), generator=g)
    lengths[0] = length  # at least one full-length user
    return lengths


# --------------------------------------------------------------------------- config


def test_config_validation():
    SVDAttentionConfig(dim=8, rank=8, mode="exact")
    with pytest.raises(ValueError, match="rank"):
        SVDAttentionConfig(dim=8, rank=9)
    with pytest.raises(ValueError, match="rank"):
        SVDAttentionConfig(dim=8, rank=0)
    with pytest.raises(ValueError, match="mode"):
        SVDAttentionConfig(dim=8, rank=4, mode="fast")
    with pytest.raises(ValueError, match="dim"):
        SVDAttentionConfig(dim=0, rank=1)
    with pytest.raises(ValueError, match="gram_dtype"):
        SVDAttentionConfig(dim=8, rank=4, gram_dtype="float16")


def test_rank_tolerance_twins_agree():
    for dt in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        for d in (1, 16, 64, 512):
            assert svd_mod.rank_tolerance(dt, d) == ref_mod.rank_tolerance(dt, d)


def test_state_dict_copies_between_reference_and_svd_modules():
    ref = TargetAttention(8)
    fast = SVDAttention(SVDAttentionConfig(dim=8, rank=8, mode="exact"))
    fast.load_state_dict(ref.state_dict())
    g = gen(1)
    x, q, lengths = randn(g, 2, 6, 8, dtype=torch.float32), randn(g, 2, 3, 8, dtype=torch.float32), torch.tensor([6, 2])
    assert rel(fast(x, lengths, q), ref(x, lengths, q)) <= 1e-6
    ref.load_state_dict(fast.state_dict())


# --------------------------------------------------------------------------- exact vs reference


def _exact_parity(seed, b, length, pad, cands, d, rank, k, dtype):
    g = gen(seed)
    k = min(k, rank)
    x, a = low_rank_history(g, b, length + pad, k, d, dtype)
    lengths = random_lengths(g, b, length)
    x = x.requires_grad_()
    q = randn(g, b, cands, d, dtype=dtype).requires_grad_()
    m = make_module(d, rank, "exact", g, dtype)
    out = m(x, lengths, q)
    ref = reference_target_attention(x, lengths, q, *weights(m))
    tol = TOL[dtype]
    assert rel(out, ref) <= tol
    cot = randn(g, *out.shape, dtype=dtype)
    inputs = [q, *weights(m), x]
    g_out, g_ref = grads(out, cot, inputs), grads(ref, cot, inputs)
    for name, ga, gb in zip(["Q", "W_Q", "W_K", "W_V"], g_out[:4], g_ref[:4]):
        assert rel(ga, gb) <= tol, name
    gx, gx_ref = g_out[4].double(), g_ref[4].double()
    # Truncation to rank R drops the first-order part of dX orthogonal to both the
    # column space (P_U) and the top-R row space (P_V) of X, so our X-gradient is
    # the reference's projected onto the tangent space of rank-R matrices at X:
    # P_U G + G P_V - P_U G P_V. With R >= D, P_V = I and this is G itself.
    v = svd_factors(x.detach(), lengths, rank).V.double()  # (B, D, R)
    for i in range(b):
        n = int(lengths[i])
        p_v = torch.eye(d, dtype=torch.float64) if rank >= d else v[i] @ v[i].mT  # (D, D)
        p_u = torch.zeros(length + pad, length + pad, dtype=torch.float64)  # (L, L)
        if n > 0:
            ua, sa, _ = torch.linalg.svd(a[i, :n], full_matrices=False)
            ua = ua[:, sa > 1e-9 * sa.max()]
            p_u[:n, :n] = ua @ ua.mT
        gi = gx_ref[i]
        expected = p_u @ gi + gi @ p_v - p_u @ gi @ p_v
        assert rel(gx[i], expected) <= tol, f"user {i}"
        if rank >= d:
            assert rel(gx[i], gi) <= tol
        assert torch.all(gx[i, n:] == 0)


@FAST
@given(
    seed=st.integers(0, 2**31 - 1),
    b=st.integers(1, 3),
    length=st.integers(1, 10),
    pad=st.integers(0, 3),
    cands=st.integers(1, 4),
    d=st.integers(2, 8),
    rank_frac=st.floats(0.0, 1.0),
    k=st.integers(1, 8),
)
def test_exact_matches_reference_when_rank_fits_float64(seed, b, length, pad, cands, d, rank_frac, k):
    rank = 1 + int(rank_frac * (d - 1))
    _exact_parity(seed, b, length, pad, cands, d, rank, k, torch.float64)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), d=st.sampled_from([4, 8, 16]), rank_frac=st.floats(0.0, 1.0), k=st.integers(1, 16))
def test_exact_matches_reference_when_rank_fits_float32(seed, d, rank_frac, k):
    rank = 1 + int(rank_frac * (d - 1))
    _exact_parity(seed, 2, 24, 3, 5, d, rank, k, torch.float32)


def test_exact_factor_path_at_full_rank_matches_reference_gradients():
    # R = D with factors passed (no shortcut): V V^T = I, so even the X-gradient,
    # which flows through the differentiable factors, equals the reference's.
    g = gen(7)
    d = 5
    x = randn(g, 2, 9, d).requires_grad_()
    q = randn(g, 2, 3, d).requires_grad_()
    lengths = torch.tensor([9, 4])
    m = make_module(d, d, "exact", g)
    out = m(x, lengths, q, svd_factors(x, lengths, d))
    ref = reference_target_attention(x, lengths, q, *weights(m))
    assert rel(out, ref) <= 1e-10
    cot = randn(g, *out.shape)
    for ga, gb in zip(grads(out, cot, [x, q, *weights(m)]), grads(ref, cot, [x, q, *weights(m)])):
        assert rel(ga, gb) <= 1e-8


# --------------------------------------------------------------------------- twins on generic inputs


def _min_rel_gap(x: torch.Tensor, lengths: torch.Tensor, rank: int) -> float:
    """Smallest relative gap among the top R+1 singular values over users (float64)."""
    worst = math.inf
    for i in range(x.shape[0]):
        n = int(lengths[i])
        if n == 0:
            continue
        s = torch.linalg.svdvals(x[i, :n].double())
        s = torch.cat([s, s.new_zeros(rank + 1)])[: rank + 1]
        worst = min(worst, float(((s[:-1] - s[1:]) / s[0]).min()))
    return worst


@FAST
@given(
    seed=st.integers(0, 2**31 - 1),
    b=st.integers(1, 3),
    length=st.integers(1, 9),
    pad=st.integers(0, 2),
    d=st.integers(2, 6),
    rank_frac=st.floats(0.0, 1.0),
    normalize=st.booleans(),
)
def test_modes_match_plain_svd_twins_on_generic_inputs(seed, b, length, pad, d, rank_frac, normalize):
    """Generic full-rank X: exact == attention on torch.linalg.svd's truncation, compact ==
    its per-user loop twin; outputs and all gradients (X included). Singular values
    closer than 1e-3 make both sides ill-conditioned, so such draws are skipped."""
    g = gen(seed)
    rank = 1 + int(rank_frac * (d - 1))
    x = randn(g, b, length + pad, d)
    lengths = random_lengths(g, b, length)
    assume(_min_rel_gap(x, lengths, min(rank, length)) > 1e-3)
    x = x.requires_grad_()
    q = randn(g, b, 3, d).requires_grad_()
    for mode in ("exact", "compact"):
        m = make_module(d, rank, mode, g, normalize=normalize)
        out = m(x, lengths, q)
        if mode == "exact":
            twin = reference_truncated_attention(x, lengths, q, *weights(m), rank)
        else:
            twin = reference_compact_attention(x, lengths, q, *weights(m), rank, normalize_tokens=normalize)
        assert rel(out, twin) <= 1e-8, mode
        cot = randn(g, *out.shape)
        inputs = [x, q, *weights(m)]
        for name, ga, gb in zip(["X", "Q", "W_Q", "W_K", "W_V"], grads(out, cot, inputs), grads(twin, cot, inputs)):
            assert torch.isfinite(ga).all()
            assert rel(ga, gb) <= 1e-6, (mode, name)


@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_custom_backward_passes_gradcheck(seed):
    """The guarded eigh backward agrees with finite differences at generic points."""
    g = gen(seed)
    x = randn(g, 2, 7, 4).requires_grad_()
    q = randn(g, 2, 3, 4).requires_grad_()
    lengths = torch.tensor([7, 5])
    assume(_min_rel_gap(x.detach(), lengths, 3) > 1e-2)
    for mode in ("exact", "compact"):
        m = make_module(4, 2, mode, g)
        assert torch.autograd.gradcheck(lambda x_, q_: m(x_, lengths, q_), (x, q))

    def factors(x_):
        f = svd_factors(x_, lengths, 3)
        return f.U, f.S, f.V

    assert torch.autograd.gradcheck(factors, (x,))


# --------------------------------------------------------------------------- padding, signs


@FAST
@given(
    seed=st.integers(0, 2**31 - 1),
    b=st.integers(1, 3),
    length=st.integers(1, 9),
    pad=st.integers(1, 5),
    d=st.integers(2, 7),
    rank_frac=st.floats(0.0, 1.0),
)
def test_padding_garbage_never_changes_outputs_or_gradients(seed, b, length, pad, d, rank_frac):
    g = gen(seed)
    rank = 1 + int(rank_frac * (d - 1))
    x = randn(g, b, length, d)
    lengths = random_lengths(g, b, length)
    garbage = randn(g, b, pad, d) * 1e6
    garbage[:, 0, 0] = float("nan")
    garbage[:, -1, -1] = float("inf")
    # garbage also overwrites the padded tail of shorter users
    x_pad = torch.cat([x, garbage], dim=1)
    for i in range(b):
        x_pad[i, int(lengths[i]) : length] = randn(g, length - int(lengths[i]), d) * 1e6
    assert torch.isnan(x_pad).any() and torch.isinf(x_pad).any()
    x, x_pad = x.requires_grad_(), x_pad.requires_grad_()
    q = randn(g, b, 3, d)
    for mode, normalize, gram in MODES:
        m = make_module(d, rank, mode, g, normalize=normalize, gram=gram)
        out, out_pad = m(x, lengths, q), m(x_pad, lengths, q)
        assert torch.isfinite(out_pad).all()
        assert rel(out_pad, out) <= 1e-8, mode
        cot = randn(g, *out.shape)
        (gx,) = grads(out, cot, [x])
        (gx_pad,) = grads(out_pad, cot, [x_pad])
        assert torch.isfinite(gx_pad).all()
        valid = torch.arange(length + pad)[None, :] < lengths[:, None]  # (B, L + pad)
        assert torch.all(gx_pad[~valid] == 0)
        assert rel(gx_pad[:, :length], gx) <= 1e-6, mode
    ref = reference_target_attention(x_pad, lengths, q, *weights(m))
    assert rel(ref, reference_target_attention(x, lengths, q, *weights(m))) <= 1e-12


@FAST
@given(
    seed=st.integers(0, 2**31 - 1),
    b=st.integers(1, 3),
    length=st.integers(1, 9),
    d=st.integers(2, 7),
    rank_frac=st.floats(0.0, 1.0),
)
def test_sign_flipped_factors_give_the_same_output(seed, b, length, d, rank_frac):
    g = gen(seed)
    rank = 1 + int(rank_frac * (d - 1))
    x = randn(g, b, length, d)
    lengths = random_lengths(g, b, length)
    q = randn(g, b, 3, d)
    f = svd_factors(x, lengths, rank)
    flip = torch.where(torch.rand(b, rank, generator=g, dtype=torch.float64) < 0.5, -1.0, 1.0)  # (B, R)
    flip[0, 0] = -1.0  # at least one pair flipped
    flipped = SVDFactors(f.U * flip[:, None, :], f.S, f.V * flip[:, None, :])
    # canonical signs: each U column sums to >= 0
    assert torch.all(f.U.sum(dim=1) >= -1e-9)
    for mode, normalize, gram in MODES:
        m = make_module(d, rank, mode, g, normalize=normalize, gram=gram)
        plain = m(x, lengths, q)
        assert rel(m(x, lengths, q, f), plain) <= 1e-8, mode
        assert rel(m(x, lengths, q, flipped), plain) <= 1e-8, mode
        assert rel(m(x, lengths, q, SVDFactors(None, flipped.S, flipped.V)), plain) <= 1e-8, mode


# --------------------------------------------------------------------------- degenerate inputs


def _orthogonal_rows(g, n, d, scale=3.0):
    qmat, _ = torch.linalg.qr(randn(g, d, d))
    return scale * qmat[:n]  # (n, D), equal singular values


DEGENERATE = {
    "rank_deficient": lambda g: (randn(g, 10, 2) @ randn(g, 2, 6)),  # rank 2 < R
    "equal_singular_values": lambda g: _orthogonal_rows(g, 4, 6),  # four equal sigmas
    "all_equal_full_rank": lambda g: _orthogonal_rows(g, 6, 6),  # sigma_1 = ... = sigma_D
    "duplicate_events": lambda g: randn(g, 1, 6).expand(5, 6).clone(),  # rank 1, 5 copies
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("rank", [2, 4, 6])
@pytest.mark.parametrize("kind", list(DEGENERATE))
def test_gradients_finite_on_rank_deficient_and_repeated_singular_values(kind, rank, dtype):
    g = gen(hash((kind, rank)) % 2**31)
    x0 = DEGENERATE[kind](g)  # (n, D)
    n, d = x0.shape
    x = torch.cat([x0, randn(g, 2, d)], dim=0)[None].to(dtype).requires_grad_()  # padded (1, n + 2, D)
    lengths = torch.tensor([n])
    q = randn(g, 1, 4, d, dtype=dtype).requires_grad_()
    for mode, normalize, gram in MODES:
        m = make_module(d, rank, mode, g, dtype, normalize=normalize, gram=gram)
        out = m(x, lengths, q)
        assert torch.isfinite(out).all(), mode
        gs = grads(out, randn(g, *out.shape, dtype=dtype), [x, q, *weights(m)])
        assert all(torch.isfinite(t).all() for t in gs), mode
        # finite is not enough: an unguarded 1/(lambda_i - lambda_j) gives ~1e15
        # here (float64 rounding gaps) and ~1e8 for float32 inputs; guarded, the
        # inputs are O(1) and so are the gradients
        assert max(float(t.abs().max()) for t in gs) <= 1e3, mode
    f = svd_factors(x, lengths, rank)
    total = (f.U * randn(g, *f.U.shape, dtype=dtype)).sum() + f.S.sum() + (f.V * randn(g, *f.V.shape, dtype=dtype)).sum()
    (gx,) = torch.autograd.grad(total, [x])
    assert torch.isfinite(gx).all()


def test_rank_deficient_compact_masks_zero_energy_tokens():
    # a rank-2 history has two interest tokens, whatever R: zero-energy tokens must
    # not take softmax mass (they would dilute the output towards 0)
    g = gen(3)
    x = (randn(g, 1, 10, 2) @ randn(g, 1, 2, 6)).requires_grad_()
    q = randn(g, 1, 4, 6)
    lengths = torch.tensor([10])
    m2, m5 = make_module(6, 2, "compact", g), make_module(6, 5, "compact", g)
    m5.load_state_dict(m2.state_dict())
    assert rel(m5(x, lengths, q), m2(x, lengths, q)) <= 1e-8


# --------------------------------------------------------------------------- empty histories


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_empty_history_gives_zeros_and_leaves_others_unchanged(dtype):
    g = gen(11)
    d, rank = 6, 3
    x = randn(g, 3, 8, d, dtype=dtype).requires_grad_()
    lengths = torch.tensor([8, 0, 5])
    q = randn(g, 3, 4, d, dtype=dtype).requires_grad_()
    keep = torch.tensor([0, 2])
    for mode, normalize, gram in MODES:
        m = make_module(d, rank, mode, g, dtype, normalize=normalize, gram=gram)
        out = m(x, lengths, q)
        assert torch.all(out[1] == 0), mode
        alone = m(x[keep], lengths[keep], q[keep])
        assert rel(out[keep], alone) <= TOL[dtype], mode
        gs = grads(out, randn(g, *out.shape, dtype=dtype), [x, q, *weights(m)])
        assert all(torch.isfinite(t).all() for t in gs), mode
        assert torch.all(gs[0][1] == 0) and torch.all(gs[1][1] == 0), mode
    ref = reference_target_attention(x, lengths, q, *weights(m))
    assert torch.all(ref[1] == 0)
    assert all(torch.isfinite(t).all() for t in grads(ref, torch.ones_like(ref), [x, q]))
    # an all-empty batch, and a zero-length padded axis
    for xs, ls in ((x, torch.zeros(3, dtype=torch.long)), (x[:, :0], torch.zeros(3, dtype=torch.long))):
        for mode, normalize, gram in MODES:
            m = make_module(d, rank, mode, g, dtype, normalize=normalize, gram=gram)
            out = m(xs, ls, q)
            assert torch.all(out == 0)
            assert torch.isfinite(grads(out, torch.ones_like(out), [q])[0]).all()
    # and from an incremental state that has seen no events
    m = make_module(d, rank, "compact", g, dtype)
    out = m.forward_from_state([IncrementalSVDState(d), IncrementalSVDState.from_history(x[0].detach())], q[:2])
    assert torch.all(out[0] == 0) and torch.isfinite(out).all()


# --------------------------------------------------------------------------- incremental state


@FAST
@given(
    seed=st.integers(0, 2**31 - 1),
    b=st.integers(1, 3),
    length=st.integers(1, 30),
    d=st.integers(2, 8),
    rank_frac=st.floats(0.0, 1.0),
    n_chunks=st.integers(1, 4),
    normalize=st.booleans(),
)
def test_incremental_state_equals_batch_compact(seed, b, length, d, rank_frac, n_chunks, normalize):
    g = gen(seed)
    rank = 1 + int(rank_frac * (d - 1))
    x = randn(g, b, length, d)
    lengths = random_lengths(g, b, length)
    q = randn(g, b, 3, d).requires_grad_()
    m = make_module(d, rank, "compact", g, normalize=normalize)
    batch = m(x, lengths, q)
    one_shot = [IncrementalSVDState.from_history(x[i], int(lengths[i])) for i in range(b)]
    chunked = []
    for i in range(b):
        state, n = IncrementalSVDState(d), int(lengths[i])
        cuts = sorted(torch.randint(0, n + 1, (n_chunks - 1,), generator=g).tolist())
        for lo, hi in zip([0, *cuts], [*cuts, n]):
            state.append(x[i, lo:hi])
        chunked.append(state)
        assert state.count == one_shot[i].count == n
        assert torch.allclose(state.gram, one_shot[i].gram, rtol=1e-12, atol=1e-12)
    from_state = m.forward_from_state(one_shot, q)
    assert rel(from_state, batch) <= 1e-9
    assert rel(m.forward_from_state(chunked, q), from_state) <= 1e-9
    cot = randn(g, *batch.shape)
    for ga, gb in zip(grads(from_state, cot, [q, *weights(m)]), grads(batch, cot, [q, *weights(m)])):
        assert rel(ga, gb) <= 1e-9


@pytest.mark.parametrize("gram", ["float64", "input"])
def test_incremental_state_matches_batch_for_float32_events(gram):
    # float32 events: the state sums them in float64; the batch path's Gram is
    # float64 ("float64") or a float32 GEMM ("input"), so agreement is to ~float32
    g = gen(21)
    d, rank = 16, 8
    x = randn(g, 2, 300, d, dtype=torch.float32)
    lengths = torch.tensor([300, 123])
    q = randn(g, 2, 5, d, dtype=torch.float32)
    m = make_module(d, rank, "compact", g, torch.float32, gram=gram)
    states = [IncrementalSVDState.from_history(x[i], int(lengths[i])) for i in range(2)]
    assert states[0].dtype == torch.float32
    assert rel(m.forward_from_state(states, q), m(x, lengths, q)) <= 1e-4


def test_incremental_state_appends_single_events_and_rejects_exact_mode():
    g = gen(5)
    x = randn(g, 12, 4)
    state = IncrementalSVDState(4)
    for row in x:
        state.append(row)
    assert state.count == 12
    assert torch.allclose(state.gram, x.mT @ x) and torch.allclose(state.mass, x.sum(0))
    with pytest.raises(ValueError, match="dim"):
        state.append(randn(g, 2, 5))
    with pytest.raises(ValueError, match="compact"):
        make_module(4, 2, "exact", g).forward_from_state(state, randn(g, 1, 3, 4))


# --------------------------------------------------------------------------- factor cache


def test_factor_cache_hit_does_not_recompute(monkeypatch):
    calls = []
    real = svd_mod.svd_factors

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(svd_mod, "svd_factors", counting)
    g = gen(9)
    d, rank = 6, 3
    x = randn(g, 2, 10, d)
    lengths = torch.tensor([10, 7])
    q = randn(g, 2, 4, d)
    cache = FactorCache(max_entries=8)
    fps = [history_fingerprint(x[i], int(lengths[i])) for i in range(2)]
    first = cache.get_batch(["u0", "u1"], fps, x, lengths, rank)
    assert (len(calls), cache.misses, cache.hits) == (2, 2, 0)
    second = cache.get_batch(["u0", "u1"], fps, x, lengths, rank)
    assert (len(calls), cache.misses, cache.hits) == (2, 2, 2)
    assert torch.equal(first.S, second.S) and torch.equal(first.V, second.V)
    for mode, normalize, gram in MODES:
        m = make_module(d, rank, mode, g, normalize=normalize, gram=gram)
        assert rel(m(x, lengths, q, second), m(x, lengths, q)) <= 1e-8, mode
    # a changed history (new fingerprint) or another rank recomputes; the padding does not matter
    x2 = x.clone()
    x2[1, 7] = randn(g, d)
    assert history_fingerprint(x2[1], 7) == fps[1]
    assert history_fingerprint(x2[1], 8) != fps[1]
    cache.get("u1", history_fingerprint(x2[1], 8), x2[1], 8, rank)
    cache.get("u1", history_fingerprint(x2[1], 8), x2[1], 8, rank - 1)
    assert len(calls) == 4
    cache.get("u1", history_fingerprint(x2[1], 8), x2[1], 8, rank - 1)
    assert len(calls) == 4 and cache.hits == 3
    # without U (compact needs only S, V)
    slim = FactorCache(keep_u=False).get_batch(["u0", "u1"], fps, x, lengths, rank)
    assert slim.U is None
    m = make_module(d, rank, "exact", g)
    assert rel(m(x, lengths, q, slim), m(x, lengths, q)) <= 1e-8


def test_factor_cache_evicts_least_recently_used():
    g = gen(2)
    cache = FactorCache(max_entries=2)
    x = randn(g, 5, 4)
    for key in ("a", "b", "a", "c"):
        cache.get(key, 1, x, 5, 2)
    assert len(cache) == 2 and cache.misses == 3 and cache.hits == 1
    cache.get("b", 1, x, 5, 2)
    assert cache.misses == 4


# --------------------------------------------------------------------------- float32, fidelity, benchmark


def test_float32_inputs_run_in_float64_and_cast_back():
    g = gen(4)
    d, rank = 8, 4
    x64 = randn(g, 2, 40, d)
    q64 = randn(g, 2, 5, d)
    lengths = torch.tensor([40, 17])
    for mode, normalize, gram in MODES:
        m64 = make_module(d, rank, mode, g, normalize=normalize, gram=gram)
        m32 = SVDAttention(m64.config)
        m32.load_state_dict({k: v.float() for k, v in m64.state_dict().items()})
        out32 = m32(x64.float(), lengths, q64.float())
        assert out32.dtype == torch.float32
        assert rel(out32, m64(x64, lengths, q64)) <= 1e-4, mode
        f = svd_factors(x64.float(), lengths, rank)
        assert f.U.dtype == f.S.dtype == f.V.dtype == torch.float32


def test_compact_fidelity_vs_rank_is_recorded_honestly():
    d = 32
    ranks = [1, 2, 4, 8, 16, d]
    rows = bench.compact_fidelity(d, 256, 32, ranks, gen(12))
    print("\ncompact fidelity (singular values sqrt(L) 2^-k):")
    for r in rows:
        print(f"  R={r['R']:>2}  compact {r['rel_err']:.3g}  normalized {r['rel_err_normalized']:.3g}  exact {r['rel_err_exact']:.3g}")
    for r in rows:
        assert all(math.isfinite(r[k]) for k in ("rel_err", "rel_err_normalized", "rel_err_exact"))
    # exact is lossless at full rank; compact is not, even there
    assert rows[-1]["rel_err_exact"] <= 1e-10
    assert rows[-1]["rel_err"] > 1e-2 and rows[-1]["rel_err_normalized"] > 1e-2
    # On this construction more rank never hurts compact (un-normalised) or exact;
    # this held on 40 of 40 seeds. The normalised variant is not monotone (it
    # rose from R = 16 to R = D on 25 of 40 seeds), so nothing is claimed for it.
    for key in ("rel_err", "rel_err_exact"):
        errs = [r[key] for r in rows]
        assert all(b <= a * (1 + 1e-9) for a, b in zip(errs, errs[1:])), (key, errs)


def test_benchmark_quick_writes_json(tmp_path):
    with torch.random.fork_rng():  # the CLI seeds torch globally; keep that out of other tests
        assert bench.main(["--quick", "--out", str(tmp_path)]) == 0
    assert bench.main(["--bogus"]) == 2
    payload = json.loads((tmp_path / "attention.json").read_text())
    assert {"machine", "matmul_gflops", "rows", "fidelity", "goals"} <= set(payload)
    assert payload["rows"]
    keys = {"L", "C", "D", "R", "mode", "ms", "ms_no_factor", "speedup", "rel_err", "peak_mb", "gflops"}
    for row in payload["rows"]:
        assert keys <= set(row), row
    assert {r["mode"] for r in payload["rows"]} == set(bench.MODES)
    assert [r["R"] for r in payload["rows"] if r["mode"] == "reference"] == [None]
