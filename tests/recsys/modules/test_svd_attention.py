"""SVD-attention vs its reference twins: outputs AND gradients, padding, signs, edge cases.

Inputs are drawn fresh from a torch.Generator seeded by hypothesis (never
zeros). Relative errors are norm-wise: ||a - b|| / ||b||.
"""

from __future__ import annotations

import json
import math
import typing

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from recsys.bench import attention as bench
from recsys.bench import attention_cases
from recsys.modules import reference_attention as ref_mod
from recsys.modules import svd_attention
from recsys.modules import svd_kernels as kernels
from recsys.modules.reference_attention import (
    TargetAttention,
    reference_compact_attention,
    reference_target_attention,
    reference_truncated_attention,
)
from recsys.modules.svd_attention import (
    SVDAttention,
    SVDAttentionConfig,
    SVDFactors,
    svd_factors,
)
from recsys.modules.svd_serving import IncrementalSVDState, forward_from_state

FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TOL = {torch.float64: 1e-5, torch.float32: 1e-4}
# (mode, normalize_tokens, gram_dtype)
MODES = [("truncated", False, "float64"), ("compact", False, "float64"), ("compact", True, "float64"), ("compact", False, "input")]


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
    SVDAttentionConfig(dim=8, rank=8, mode="truncated")
    assert SVDAttentionConfig(dim=8, rank=4).gram_dtype == "auto"
    with pytest.raises(ValueError, match="renamed 'truncated'"):
        SVDAttentionConfig(dim=8, rank=4, mode="exact")
    with pytest.raises(ValueError, match="taper"):
        SVDAttentionConfig(dim=8, rank=4, taper=0.0)
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
    for dim, rank in ((True, 1), (4, True)):  # bool passes isinstance(x, int)
        with pytest.raises(ValueError, match="dim|rank"):
            SVDAttentionConfig(dim=dim, rank=rank)


def test_factors_of_another_batch_size_are_refused():
    """They broadcast silently before 2026-12-01: every user got user 0's tokens."""
    from recsys.modules.svd_attention import svd_factors

    g = torch.Generator().manual_seed(0)
    att = SVDAttention(SVDAttentionConfig(dim=4, rank=2))
    x, q = torch.randn(5, 6, 4, generator=g), torch.randn(5, 3, 4, generator=g)
    lengths = torch.full((5,), 6)
    one = svd_factors(x[:1], lengths[:1], 2)
    with pytest.raises(ValueError, match="factors are of 1 users but the history batch has 5"):
        att(x, lengths, q, factors=one)
    assert att(x, lengths, q, factors=svd_factors(x, lengths, 2)).shape == (5, 3, 4)


def test_literal_annotations_list_exactly_the_accepted_values():
    hints = typing.get_type_hints(SVDAttentionConfig)
    assert typing.get_args(hints["mode"]) == svd_attention.MODES
    assert typing.get_args(hints["gram_dtype"]) == kernels.GRAM_DTYPES
    for mode in typing.get_args(hints["mode"]):
        for gram in typing.get_args(hints["gram_dtype"]):
            SVDAttentionConfig(dim=4, rank=2, mode=mode, gram_dtype=gram)
    state_hints = typing.get_type_hints(IncrementalSVDState.__init__)
    for gram in typing.get_args(state_hints["gram_dtype"]):
        IncrementalSVDState(4, 3, gram_dtype=gram)
    with pytest.raises(ValueError, match="gram_dtype"):
        IncrementalSVDState(4, 3, gram_dtype="float16")


def test_kernels_keep_their_old_import_path():
    for name in ("SVDFactorizationError", "compact_tokens", "gram_matrix", "rank_tolerance", "taper_weights",
                 "tokens_from_spectrum", "top_eigh", "GRAM_DTYPES"):
        assert getattr(svd_attention, name) is getattr(kernels, name), name
    assert set(svd_attention.__all__) <= set(dir(svd_attention))


def test_rank_tolerance_twins_agree():
    for dt in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        for d in (1, 16, 64, 512):
            assert kernels.rank_tolerance(dt, d) == ref_mod.rank_tolerance(dt, d)


def test_state_dict_copies_between_reference_and_svd_modules():
    ref = TargetAttention(8)
    fast = SVDAttention(SVDAttentionConfig(dim=8, rank=8, mode="truncated"))
    fast.load_state_dict(ref.state_dict())
    g = gen(1)
    x, q, lengths = randn(g, 2, 6, 8, dtype=torch.float32), randn(g, 2, 3, 8, dtype=torch.float32), torch.tensor([6, 2])
    assert rel(fast(x, lengths, q), ref(x, lengths, q)) <= 1e-6
    ref.load_state_dict(fast.state_dict())


# --------------------------------------------------------------------------- truncated vs reference


class FactorizationSpy:
    """Counts calls of the two factorisations, to prove which path a test took."""

    def __init__(self, monkeypatch):
        self.calls = {"gram_eigh": 0, "tapered_root": 0}
        for name, key in (("_GramEigh", "gram_eigh"), ("_TaperedRoot", "tapered_root")):
            real = getattr(kernels, name).apply

            def counted(*args, _real=real, _key=key):
                self.calls[_key] += 1
                return _real(*args)

            monkeypatch.setattr(getattr(kernels, name), "apply", counted)



def _truncated_parity(seed, b, length, pad, cands, d, rank, k, dtype, spy):
    g = gen(seed)
    k = min(k, rank)
    x, a = low_rank_history(g, b, length + pad, k, d, dtype)
    lengths = random_lengths(g, b, length)
    x = x.requires_grad_()
    q = randn(g, b, cands, d, dtype=dtype).requires_grad_()
    m = make_module(d, rank, "truncated", g, dtype)
    before = spy.calls["gram_eigh"]
    out = m(x, lengths, q)
    # R < D goes through the factorisation; R = D takes the shortcut (X_R = X)
    assert spy.calls["gram_eigh"] == before + (1 if rank < d else 0)
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
    d=st.integers(3, 8),
    rank_frac=st.floats(0.0, 1.0),
    k=st.integers(1, 8),
)
def test_truncated_through_factorization_matches_reference_float64(seed, b, length, pad, cands, d, rank_frac, k):
    """R < D, rank(X) <= R: outputs and gradients through the Gram/eigh factorisation."""
    rank = 1 + int(rank_frac * (d - 2))  # 1 <= rank <= D - 1
    with pytest.MonkeyPatch.context() as mp:
        _truncated_parity(seed, b, length, pad, cands, d, rank, k, torch.float64, FactorizationSpy(mp))


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), d=st.sampled_from([4, 8, 16]), rank_frac=st.floats(0.0, 1.0), k=st.integers(1, 16))
def test_truncated_through_factorization_matches_reference_float32(seed, d, rank_frac, k):
    rank = 1 + int(rank_frac * (d - 2))
    with pytest.MonkeyPatch.context() as mp:
        _truncated_parity(seed, 2, 24, 3, 5, d, rank, k, torch.float32, FactorizationSpy(mp))


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), d=st.integers(2, 8), dtype=st.sampled_from([torch.float64, torch.float32]))
def test_truncated_full_rank_shortcut_matches_reference(seed, d, dtype):
    """R = D skips the factorisation (X_R = X): a separate, cheaper path, tested on its own."""
    with pytest.MonkeyPatch.context() as mp:
        _truncated_parity(seed, 2, 9, 2, 3, d, d, d, dtype, FactorizationSpy(mp))


def test_exact_factor_path_at_full_rank_matches_reference_gradients():
    # R = D with factors passed (no shortcut): V V^T = I, so even the X-gradient,
    # which flows through the differentiable factors, equals the reference's.
    g = gen(7)
    d = 5
    x = randn(g, 2, 9, d).requires_grad_()
    q = randn(g, 2, 3, d).requires_grad_()
    lengths = torch.tensor([9, 4])
    m = make_module(d, d, "truncated", g)
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
    for mode in ("truncated", "compact"):
        m = make_module(d, rank, mode, g, normalize=normalize)
        out = m(x, lengths, q)
        if mode == "truncated":
            twin = reference_truncated_attention(x, lengths, q, *weights(m), rank)
        else:
            twin = reference_compact_attention(x, lengths, q, *weights(m), rank, normalize_tokens=normalize)
        # compact: a rank-deficient draw puts s_{R+1} at the Gram's noise floor
        # (~1e-8 s_1) instead of 0, which the taper turns into ~1e-7 of the output
        assert rel(out, twin) <= (1e-8 if mode == "truncated" else 1e-6), mode
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
    for mode in ("truncated", "compact"):
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
    flip_all = torch.cat([flip, torch.where(torch.rand(b, d - rank, generator=g, dtype=torch.float64) < 0.5, -1.0, 1.0)], 1)
    flipped = SVDFactors(f.U * flip[:, None, :], f.S, f.V * flip[:, None, :], f.S_all, f.V_all * flip_all[:, None, :])
    # canonical signs: each U column sums to >= 0
    assert torch.all(f.U.sum(dim=1) >= -1e-9)
    for mode, normalize, gram in MODES:
        m = make_module(d, rank, mode, g, normalize=normalize, gram=gram)
        plain = m(x, lengths, q)
        assert rel(m(x, lengths, q, f), plain) <= 1e-8, mode
        assert rel(m(x, lengths, q, flipped), plain) <= 1e-8, mode
        assert rel(m(x, lengths, q, SVDFactors(None, flipped.S, flipped.V, flipped.S_all, flipped.V_all)), plain) <= 1e-8, mode


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


def test_rank_deficient_compact_does_not_depend_on_surplus_rank():
    # a rank-2 history has two directions, whatever R: with s_{R+1} = 0 for both
    # R = 2 and R = 5 the tapered square root M is the same (up to the Gram's
    # noise floor ~1e-8 s_1 in s_{R+1}, which the taper scales by 1 / taper)
    g = gen(3)
    x = (randn(g, 1, 10, 2) @ randn(g, 1, 2, 6)).requires_grad_()
    q = randn(g, 1, 4, 6)
    lengths = torch.tensor([10])
    m2, m5 = make_module(6, 2, "compact", g), make_module(6, 5, "compact", g)
    m5.load_state_dict(m2.state_dict())
    assert rel(m5(x, lengths, q), m2(x, lengths, q)) <= 1e-6


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
    states = [IncrementalSVDState(d, 8, dtype=dtype), IncrementalSVDState.from_history(x[0].detach(), 8)]
    out = forward_from_state(m, states, q[:2])
    assert torch.all(out[0] == 0) and torch.isfinite(out).all()


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
    rows = attention_cases.compact_fidelity(d, 256, 32, ranks, gen(12))
    print("\ncompact fidelity (singular values sqrt(L) 2^-k):")
    for r in rows:
        print(f"  R={r['R']:>2}  compact {r['rel_err']:.3g}  normalized {r['rel_err_normalized']:.3g}  truncated {r['rel_err_truncated']:.3g}")
    for r in rows:
        assert all(math.isfinite(r[k]) for k in ("rel_err", "rel_err_normalized", "rel_err_truncated"))
    # truncated is lossless at full rank; compact is not an approximation of the reference, even there
    assert rows[-1]["rel_err_truncated"] <= 1e-10
    assert rows[-1]["rel_err"] > 1e-2 and rows[-1]["rel_err_normalized"] > 1e-2
    # more rank never hurts truncated on this construction (a nested sequence of truncations)
    errs = [r["rel_err_truncated"] for r in rows]
    assert all(b <= a * (1 + 1e-9) for a, b in zip(errs, errs[1:])), errs


def test_truncation_error_is_reported_on_low_rank_plus_noise_histories():
    rows = attention_cases.truncation_error(True, gen(3))
    assert rows and all(r["mode"] == "truncated" and "not a trained table" in r["data"] for r in rows)
    for r in rows:
        # 4 strong directions + noise: full numerical rank, so R = 8 < D = 16 truncates
        assert r["numerical_rank"] == r["D"]
        assert 0.6 < r["energy_top_r"] < 0.95
        assert r["rel_err"] > 1e-3


def test_benchmark_quick_writes_json(tmp_path):
    with torch.random.fork_rng():  # the CLI seeds torch globally; keep that out of other tests
        assert bench.main(["--quick", "--out", str(tmp_path)]) == 0
    assert bench.main(["--bogus"]) == 2
    payload = json.loads((tmp_path / "attention.json").read_text())
    assert {"machine", "matmul_gflops", "rows", "fidelity", "truncation", "goals"} <= set(payload)
    assert payload["rows"]
    keys = {"L", "C", "D", "R", "mode", "ms", "speedup", "rel_err", "peak_mb", "path", "gflops"}
    for row in payload["rows"]:
        assert keys <= set(row), row
    assert {r["mode"] for r in payload["rows"]} == set(bench.MODES)
    assert [r["R"] for r in payload["rows"] if r["mode"] in ("reference", "reference_fused")] == [None, None]
    assert payload["rows"][1]["mode"] == "reference_fused" and payload["rows"][1]["rel_err"] < 1e-5
    serving = {r["mode"] for r in payload["rows"] if r["path"] == "serving"}
    assert serving == {"truncated", "compact", "compact_incremental"}
    assert all(r["gram_dtype"] == "input" for r in payload["rows"] if r["path"] == "serving")
    # serving rows are also timed on a stream of distinct requests, each mode in its own runs
    for row in payload["rows"]:
        if row["path"] == "serving" or row["mode"] == "reference_fused":
            assert row["speedup_stream"] == pytest.approx(row["ref_ms_stream"] / row["ms_stream"]), row
        elif row["mode"] == "reference":
            assert row["ms_stream"] > 0
        else:
            assert "speedup_stream" not in row


# --------------------------------------------------------------------------- input validation


@pytest.mark.parametrize(
    ("lengths", "match"),
    [
        (torch.tensor([10, 1000]), r"0 <= length <= L=10.*\[1000\]"),  # used to be accepted (and moved compact by 93%)
        (torch.tensor([-1, 4]), r"0 <= length <= L=10.*\[-1\]"),  # used to return zeros silently
        (torch.tensor([11, 11]), r"\(2 of 2 out of range\)"),
        (torch.tensor([10, 4], dtype=torch.int32), "int64"),
        (torch.tensor([10.0, 4.0]), "int64"),
        (torch.tensor([[10], [4]]), r"shape \(B,\) = \(2,\)"),
        (torch.tensor([10, 4, 3]), r"shape \(B,\) = \(2,\)"),
        ([10, 4], "int64 tensor"),
    ],
)
def test_invalid_lengths_raise_clear_errors(lengths, match):
    g = gen(8)
    x, q = randn(g, 2, 10, 4), randn(g, 2, 3, 4)
    for mode, normalize, gram in MODES:
        m = make_module(4, 2, mode, g, normalize=normalize, gram=gram)
        with pytest.raises(ValueError, match=match):
            m(x, lengths, q)
    with pytest.raises(ValueError, match=match):
        svd_factors(x, lengths, 2)


def test_boundary_lengths_are_valid():
    g = gen(9)
    x, q = randn(g, 3, 10, 4), randn(g, 3, 3, 4)
    for mode, normalize, gram in MODES:
        out = make_module(4, 2, mode, g, normalize=normalize, gram=gram)(x, torch.tensor([0, 10, 3]), q)
        assert torch.all(out[0] == 0) and torch.isfinite(out).all()


def test_auto_gram_dtype_is_float64_with_autograd_and_input_without(monkeypatch):
    seen = []
    real = kernels.gram_matrix

    def spy(x, gram_dtype, lengths=None):
        seen.append(gram_dtype)
        return real(x, gram_dtype, lengths)

    monkeypatch.setattr(kernels, "gram_matrix", spy)
    g = gen(10)
    x, q, lengths = randn(g, 2, 12, 6, dtype=torch.float32), randn(g, 2, 3, 6, dtype=torch.float32), torch.tensor([12, 5])
    for mode in ("truncated", "compact"):
        m = make_module(6, 3, mode, g, torch.float32, gram="auto")
        seen.clear()
        m(x, lengths, q)
        with torch.no_grad():
            m(x, lengths, q)
        with torch.inference_mode():
            m(x, lengths, q)
        assert seen == ["float64", "input", "input"], mode
        seen.clear()
        with torch.no_grad():
            make_module(6, 3, mode, g, torch.float32, gram="float64")(x, lengths, q)  # an explicit choice wins
        assert seen == ["float64"], mode


def test_compact_without_autograd_skips_the_function_and_gives_the_same_tokens(monkeypatch):
    """Serving (no_grad, or a history that needs no gradient) takes the plain
    forward; it must give exactly the autograd Function's tokens."""
    g = gen(11)
    x = randn(g, 2, 40, 8, dtype=torch.float32)
    with_grad = x.clone().requires_grad_(True)
    for gram in ("float64", "input"):
        ref = kernels.compact_tokens(with_grad, 3, 0.05, gram)
        assert ref.grad_fn is not None
        calls = []
        real = kernels._TaperedRoot.apply
        monkeypatch.setattr(kernels._TaperedRoot, "apply", lambda *a: calls.append(1) or real(*a))
        with torch.no_grad():
            served = kernels.compact_tokens(with_grad, 3, 0.05, gram)
        plain = kernels.compact_tokens(x, 3, 0.05, gram)  # grad enabled, x needs none
        monkeypatch.undo()
        assert calls == [] and served.grad_fn is None and plain.grad_fn is None
        assert torch.equal(served, ref.detach()) and torch.equal(plain, ref.detach())


# --------------------------------------------------------------------------- the fused exact baseline


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fused_target_attention_equals_the_reference_with_padding_and_empty_histories(dtype):
    g = gen(23)
    d = 8
    clean = randn(g, 4, 12, d, dtype=dtype)
    padded = clean.clone()
    padded[2, 7:] = float("nan")  # garbage in padding reaches neither output nor gradients
    q = randn(g, 4, 5, d, dtype=dtype).requires_grad_()
    w = [randn(g, d, d, dtype=dtype).requires_grad_() for _ in range(3)]
    for x, lengths in ((padded, torch.tensor([12, 3, 7, 0])), (clean, torch.tensor([12, 12, 12, 12]))):
        x = x.requires_grad_()
        ref = reference_target_attention(x, lengths, q, *w)
        out = ref_mod.fused_target_attention(x, lengths, q, *w)
        assert rel(out, ref) <= TOL[dtype], lengths
        upstream = randn(g, *ref.shape, dtype=dtype)
        for a, b in zip(grads(out, upstream, [x, q, *w]), grads(ref, upstream, [x, q, *w])):
            assert torch.isfinite(a).all() and rel(a, b) <= 10 * TOL[dtype], lengths
    assert torch.all(ref_mod.fused_target_attention(padded, torch.tensor([12, 3, 7, 0]), q, *w)[3] == 0)
    empty = ref_mod.fused_target_attention(clean[:, :0], torch.zeros(4, dtype=torch.long), q, *w)  # no history axis
    assert torch.all(empty == 0) and torch.isfinite(grads(empty, torch.ones_like(empty), [q])[0]).all()


def test_bench_goals_read_the_stream_timings_and_the_fused_baseline():
    base = {"C": 1_000, "D": 64}
    rows = [
        {**base, "L": 10_000, "R": None, "mode": "reference_fused", "path": None, "ms_stream": 30.0},
        {**base, "L": 10_000, "R": 32, "mode": "compact", "path": "serving", "speedup": 35.0,
         "speedup_stream": 51.0, "ms_stream": 2.0, "other_load_stream": 0.0},
    ]
    goals = {g["goal"].split(",")[0] + ("/SDPA" if "SDPA" in g["goal"] else "") + ("/inter" if "interleaved" in g["goal"] else ""): g
             for g in bench.goals(rows)}
    assert goals["compact serving L=10k C=1000 R=32 speedup (factors included)"]["status"] == "PASS"  # 51x stream
    assert goals["info: compact serving L=10k C=1000 R=32 speedup/inter"]["value"] == 35.0
    sdpa = goals["info: compact serving L=10k C=1000 R=32 vs fused exact attention (SDPA)/SDPA"]
    assert sdpa["value"] == 15.0 and sdpa["status"] == "MISS"
    assert goals["compact_incremental (windowed state) L=50k C=1000 R=32 speedup"]["status"] == "n/a"


# --------------------------------------------------------------------------- jagged histories


def _jagged(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Padded (B, L, D) -> the valid rows back to back (sum lengths, D)."""
    return torch.cat([x[i, : int(n)] for i, n in enumerate(lengths)])


@FAST
@given(
    seed=st.integers(0, 2**31 - 1),
    b=st.integers(1, 4),
    length=st.integers(1, 12),
    d=st.integers(2, 7),
    rank_frac=st.floats(0.0, 1.0),
    normalize=st.booleans(),
    gram=st.sampled_from(["float64", "input"]),
    dtype=st.sampled_from([torch.float64, torch.float32]),
)
def test_jagged_compact_equals_padded_outputs_and_gradients(seed, b, length, d, rank_frac, normalize, gram, dtype):
    """forward_jagged (no padding, per-history Gram and backward) computes what
    forward computes on the zero-padded history, including empty histories."""
    g = gen(seed)
    rank = 1 + int(rank_frac * (d - 1))
    lengths = random_lengths(g, b, length)
    x = randn(g, b, length, d, dtype=dtype)
    x = torch.where(torch.arange(length)[None, :, None] < lengths[:, None, None], x, torch.zeros((), dtype=dtype))
    q = randn(g, b, 3, d, dtype=dtype)
    m = make_module(d, rank, "compact", g, dtype, normalize=normalize, gram=gram)
    xp = x.clone().requires_grad_()
    xj = _jagged(x, lengths).requires_grad_()
    out_p, out_j = m(xp, lengths, q), m.forward_jagged(xj, lengths, q)
    tol = TOL[dtype] if gram == "float64" or dtype == torch.float64 else 1e-3
    assert rel(out_j, out_p) < tol
    cot = randn(g, *out_p.shape, dtype=dtype)
    (gp,) = grads(out_p, cot, [xp])
    (gj,) = grads(out_j, cot, [xj])
    assert rel(gj, _jagged(gp, lengths)) < tol


def test_jagged_compact_passes_gradcheck():
    g = gen(11)
    lengths = torch.tensor([7, 0, 5])
    x = randn(g, 12, 4).requires_grad_()
    q = randn(g, 3, 3, 4).requires_grad_()
    m = make_module(4, 2, "compact", g)
    assert torch.autograd.gradcheck(lambda x_, q_: m.forward_jagged(x_, lengths, q_), (x, q))


def test_jagged_float64_gram_chunks_long_histories(monkeypatch):
    """A float32 history longer than one conversion chunk gives the one-GEMM float64 Gram."""
    monkeypatch.setattr(kernels, "_CHUNK_ELEMS", 64)  # chunks of the 256-row floor: 3 for the 700-row history
    g = gen(12)
    lengths = [700, 0, 300]
    x = randn(g, sum(lengths), 4, dtype=torch.float32)
    got = kernels.gram_matrix(x, "float64", lengths)
    x64 = x.double()
    want = torch.stack([s.mT @ s for s in torch.split(x64, lengths)])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "values, lengths, queries, match",
    [
        (torch.zeros(5, 3), torch.tensor([2, 3]), torch.zeros(2, 1, 4), r"values must be \(sum lengths, 4\)"),
        (torch.zeros(5, 4), torch.tensor([2, 2]), torch.zeros(2, 1, 4), "sum to 4 but the jagged history has 5 rows"),
        (torch.zeros(5, 4), torch.tensor([6, -1]), torch.zeros(2, 1, 4), "must be >= 0"),
        (torch.zeros(5, 4), torch.tensor([2.0, 3.0]), torch.zeros(2, 1, 4), "int64 tensor"),
        (torch.zeros(5, 4), torch.tensor([2, 3]), torch.zeros(3, 1, 4), r"queries must be \(B=2"),
    ],
)
def test_jagged_inputs_are_checked(values, lengths, queries, match):
    m = make_module(4, 2, "compact", gen(13), torch.float32)
    with pytest.raises(ValueError, match=match):
        m.forward_jagged(values, lengths, queries)


def test_jagged_is_compact_only():
    m = make_module(4, 2, "truncated", gen(14), torch.float32)
    with pytest.raises(ValueError, match="compact mode only"):
        m.forward_jagged(torch.zeros(3, 4), torch.tensor([3]), torch.zeros(1, 2, 4))


@pytest.mark.parametrize(("d", "r", "length"), [(16, 8, 3), (16, 16, 4), (32, 16, 5)])
def test_float32_serving_matches_training_on_histories_of_rank_below_r(d, r, length):
    """A probe (2026-12-01): the float32 Gram's rounding gives the directions
    a short history lacks singular values ~3e-4 s_1, which the taper then
    weighted: served (no_grad) output differed from the float64 training
    path by 1e-4..6e-4 relative. They now count as zero (the route's rank
    tolerance), as the backward already treated them."""
    g = torch.Generator().manual_seed(d + length)
    att = SVDAttention(SVDAttentionConfig(dim=d, rank=r))
    for _ in range(10):
        x, q = torch.randn(1, length, d, generator=g) * 3, torch.randn(1, 20, d, generator=g)
        lengths = torch.tensor([length])
        with torch.no_grad():
            served = att(x, lengths, q)
        trained = att(x, lengths, q).detach()
        assert float((served - trained).norm() / trained.norm()) < 1e-5
