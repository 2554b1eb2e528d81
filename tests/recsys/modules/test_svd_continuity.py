"""Continuity of compact SVD-attention: a relative input change eps moves the
output by at most C eps, on inputs BUILT to sit on the edge cases.

Why: an earlier compact jumped by 92% for a 2e-16 input change at a sign tie
(sign(v_r . X^T 1) = 0) and at an eigenvalue crossing at the rank cutoff. Goal:
< 1e-4 relative output change for a 1e-6 relative input perturbation. Each case
also checks that the input really sits on its edge (a sign rule would flip, the
truncated mode jumps, eigh's basis rotates), so the property cannot pass by
missing the edge.
"""

from __future__ import annotations

import math

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from recsys.modules.svd_attention import SVDAttention, SVDAttentionConfig, svd_factors

EPS = 1e-6
GOAL = 1e-4
CASES = ("sign_tie", "cutoff_crossing", "interior_crossing", "zero_at_cutoff")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def orthonormal(g: torch.Generator, n: int, k: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    return q  # (n, k)


def adversarial(case: str, g: torch.Generator, n: int, d: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(X (n, D), the perturbation direction Delta (n, D) with ||Delta||_F = 1) sitting on `case`."""
    s = torch.linspace(3.0, 1.0, d, dtype=torch.float64)  # distinct singular values
    if case == "sign_tie":
        # X = [Y; -Y]: X^T 1 = 0, so v_r . X^T 1 = 0 for EVERY r; Delta = 1 w^T moves the mass both ways
        y = torch.randn(n // 2, d, generator=g, dtype=torch.float64)
        x = torch.cat([y, -y])  # (n, D) with n even
        delta = torch.ones(x.shape[0], 1, dtype=torch.float64) @ torch.randn(1, d, generator=g, dtype=torch.float64)
        return x, delta / delta.norm()
    if case == "cutoff_crossing":
        s[rank] = s[rank - 1]  # s_R = s_{R+1}: which one is kept is decided by the perturbation's sign
        a, b = rank - 1, rank
    elif case == "interior_crossing":
        s[1] = s[0]  # two kept directions with one singular value: eigh's basis is arbitrary
        a, b = 0, 1
    else:  # zero_at_cutoff: rank(X) = R - 1, so s_R = s_{R+1} = 0 (a crossing at zero)
        s[rank - 1 :] = 0.0
        a, b = rank - 1, rank
    u, v = orthonormal(g, n, d), orthonormal(g, d, d)
    x = (u * s) @ v.mT  # (n, D)
    # Delta raises s_a and lowers s_b (for zero_at_cutoff: grows one of the two null directions),
    # so +Delta and -Delta order the crossing pair differently; plus a random part
    split = u[:, a : a + 1] @ v[:, a : a + 1].mT - u[:, b : b + 1] @ v[:, b : b + 1].mT
    delta = split + 0.1 * torch.randn(n, d, generator=g, dtype=torch.float64) / math.sqrt(n * d)
    return x, delta / delta.norm()


def on_the_edge(case: str, x: torch.Tensor, delta: torch.Tensor, rank: int, q: torch.Tensor, w: list[torch.Tensor]) -> bool:
    """Whether `case` really is an edge at x: a discontinuous rule would jump between x +- eps delta."""
    lengths = torch.tensor([x.shape[0]])
    plus, minus = (x + EPS * x.norm() * delta)[None], (x - EPS * x.norm() * delta)[None]
    if case == "sign_tie":
        # the old sign rule sign(v_r . X^T 1) (kept by svd_factors) flips some token
        vp, vm = svd_factors(plus, lengths, rank).V, svd_factors(minus, lengths, rank).V
        return bool(((vp * vm).sum(dim=1) < 0).any())
    if case == "interior_crossing":
        vp, vm = svd_factors(plus, lengths, rank).V, svd_factors(minus, lengths, rank).V
        return abs(float((vp[0, :, 0] * vm[0, :, 0]).sum())) < 0.99  # the top eigenvector rotates
    if case == "zero_at_cutoff":
        # two null directions cross at 0: truncated barely moves (both carry ~eps), so no jump
        # detector applies; the old compact's hard token mask (s > tol s_1) was the edge here
        return True
    # a hard cutoff (truncated mode) swaps the kept subspace
    m = SVDAttention(SVDAttentionConfig(dim=x.shape[1], rank=rank, mode="truncated", gram_dtype="float64")).double()
    m.load_state_dict({"w_q": w[0], "w_k": w[1], "w_v": w[2]})
    with torch.no_grad():
        return rel(m(plus, lengths, q), m(minus, lengths, q)) > 1e-3


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**31 - 1),
    case=st.sampled_from(CASES),
    d=st.integers(3, 8),
    rank_frac=st.floats(0.0, 1.0),
    normalize=st.booleans(),
    route=st.sampled_from([(torch.float64, "float64"), (torch.float32, "input"), (torch.float32, "float64")]),
)
def test_compact_is_continuous_on_adversarial_inputs(seed, case, d, rank_frac, normalize, route):
    dtype, gram = route
    # interior_crossing needs two kept directions; zero_at_cutoff needs rank(X) = R - 1 >= 1
    rank = 2 + int(rank_frac * (d - 3)) if case in ("interior_crossing", "zero_at_cutoff") else 1 + int(rank_frac * (d - 2))
    g = torch.Generator().manual_seed(seed)
    n = 4 * d
    x, delta = adversarial(case, g, n, d, rank)
    q = torch.randn(1, 5, d, generator=g, dtype=torch.float64)
    w = [torch.randn(d, d, generator=g, dtype=torch.float64) / math.sqrt(d) for _ in range(3)]
    assert on_the_edge(case, x, delta, rank, q, w), case
    m = SVDAttention(SVDAttentionConfig(dim=d, rank=rank, mode="compact", normalize_tokens=normalize, gram_dtype=gram))
    m = m.to(dtype)
    m.load_state_dict({"w_q": w[0].to(dtype), "w_k": w[1].to(dtype), "w_v": w[2].to(dtype)})
    lengths = torch.tensor([n])
    with torch.no_grad():
        outs = [m((x + t * EPS * x.norm() * delta)[None].to(dtype), lengths, q.to(dtype)) for t in (-1.0, 0.0, 1.0)]
    assert torch.isfinite(torch.stack(outs)).all()
    assert outs[1].abs().max() > 0  # a zero output would be continuous trivially
    # The goal holds in float64. Float32 inputs cannot resolve a 1e-6 change: a float32 Gram
    # puts zero singular values at ~sqrt(eps32) ~ 3e-4 s_1 (hypothesis found a 1.005e-3 output
    # change on zero_at_cutoff at d = 4), so that route is held to its rounding level instead:
    # 3e-3, still far below the O(1) jumps of a discontinuity (the old compact's: 0.92).
    tol = GOAL if dtype == torch.float64 else 3e-3
    # x -+ eps delta are eps from x (the goal) and 2 eps from each other (twice the goal)
    for a, b, bound in ((outs[0], outs[1], tol), (outs[2], outs[1], tol), (outs[0], outs[2], 2 * tol)):
        assert rel(a, b) < bound, (case, rel(a, b))


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), case=st.sampled_from(CASES), d=st.integers(3, 6))
def test_continuity_constant_is_bounded_across_scales(seed, case, d):
    """||out(x + eps delta) - out(x)|| / (eps ||out(x)||) stays below ~1 / taper as eps shrinks (float64)."""
    g = torch.Generator().manual_seed(seed)
    rank = 2 if case in ("interior_crossing", "zero_at_cutoff") else max(1, d // 2)
    x, delta = adversarial(case, g, 4 * d, d, rank)
    w = [torch.randn(d, d, generator=g, dtype=torch.float64) / math.sqrt(d) for _ in range(3)]
    q = torch.randn(1, 5, d, generator=g, dtype=torch.float64)
    m = SVDAttention(SVDAttentionConfig(dim=d, rank=rank, normalize_tokens=True, gram_dtype="float64")).double()
    m.load_state_dict({"w_q": w[0], "w_k": w[1], "w_v": w[2]})
    lengths = torch.tensor([x.shape[0]])
    with torch.no_grad():
        base = m(x[None], lengths, q)
        for eps in (1e-3, 1e-5, 1e-7):
            out = m((x + eps * x.norm() * delta)[None], lengths, q)
            assert rel(out, base) / eps < 1.0 / m.config.taper * 5, (case, eps, rel(out, base) / eps)
