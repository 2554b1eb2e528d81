"""Numerical kernels of SVD-attention: the Gram matrix, its eigendecomposition,
and the two differentiable factorisations the op is built on.

Shape legend:
    B  users (requests) in the batch
    L  history length (rows already masked: padding is zero)
    D  embedding dim
    K  singular directions returned (the rank R, or D)

Every kernel takes a masked history X (B, L, D); the Gram and compact's
factorisation also take jagged rows (sum lengths, D) with the per-history
`lengths` as Python ints (`jagged_segments`), one GEMM per history and no
padding. Input checks and masking live in `recsys.modules.svd_attention`, the
op built on these kernels.

Gram (`gram_matrix`): G = X^T X, O(L D^2). "float64" forms it in float64
(float32 histories are converted chunk by chunk through one reused buffer);
"input" forms it with one GEMM in the history's dtype and then casts, so G
carries that dtype's rounding (~1e-7 relative in float32) and the backward's
thresholds sit higher. eigh (`top_eigh`) always runs in float64, batched
over users (a threaded float32 eigh of a small matrix can be far slower).

Factorisations:
- `factorize` (`_GramEigh`): top-K singular values S (B, K) and vectors
  V (B, D, K) of X through eigh(G); truncated mode's path.
- `compact_tokens` (`_TaperedRoot`): M = V diag(h(s)) V^T (B, D, D), the PSD
  square root of G with the spectrum tapered to the top R directions
  (`taper_weights`); compact mode's tokens.

Gradients. `_GramEigh`: a custom autograd function on X whose eigh backward
zeroes the 1/(lambda_i - lambda_j) terms of pairs closer than the Gram's or
the inputs' rounding (the "robust differentiable SVD" guard). `_TaperedRoot`:
its backward is the Daleckii-Krein formula for the spectral function M(G)
(divided differences (h_i - h_j)/(lambda_i - lambda_j), bounded by the
Lipschitz constant of h, with the derivative at near-equal pairs) plus the
terms through s_1 and s_{R+1}; both finite on rank-deficient and
repeated-singular-value inputs.
"""

from __future__ import annotations

from typing import Literal, NamedTuple, get_args

import torch
from torch import Tensor

from features.core.errors import RecsysError

# "auto" is resolved by the op (`svd_attention.resolve_gram_dtype`); kernels take a resolved value
GramDtype = Literal["auto", "float64", "input"]
ResolvedGramDtype = Literal["float64", "input"]
GRAM_DTYPES: tuple[GramDtype, ...] = get_args(GramDtype)


# Eigenvalue pairs closer than this fraction of lambda_max are treated as
# degenerate in the backward: their coupling term is dropped (truncated) or
# replaced by the derivative (compact). A float64 Gram resolves eigenvalues to
# ~D eps64 lambda_max.
_GAP_TOL = 1e-10
# A float32 Gram product carries ~1e-7 relative error (measured ~1e-8
# lambda_max on eigenvalues at L = 10k..50k), so its thresholds sit higher.
_INPUT_GRAM_RANK_TOL = 1e-3
_INPUT_GRAM_GAP_TOL = 1e-6


def rank_tolerance(dtype: torch.dtype, dim: int) -> float:
    """Singular values below this fraction of the largest count as zero.

    The Gram route resolves singular values only down to ~sqrt(eps64) ~ 1e-8 of
    the largest (eigenvalue error ~ D eps64 lambda_max), so 1e-6 is the floor;
    float32 inputs carry their own rounding noise at ~D eps32.
    """
    # capped so that half-precision inputs (eps ~ 1e-3) do not zero every direction
    return min(max(1e-6, 4.0 * dim * torch.finfo(dtype).eps), 1e-3)


class _Tolerances(NamedTuple):
    rank: float  # S_r <= rank * S_max counts as zero
    lam_gap: float  # |lambda_i - lambda_j| <= lam_gap * lambda_max: degenerate (Gram rounding)
    sigma_gap: float  # |S_i - S_j| <= sigma_gap * S_max: degenerate (input rounding)


def rank_floor(dtype: torch.dtype, dim: int, gram_dtype: ResolvedGramDtype) -> float:
    """The rank tolerance (relative to s_1) of a Gram route: inputs of `dtype`, Gram `gram_dtype`."""
    return _tolerances(dtype, dim, gram_dtype).rank


def _tolerances(dtype: torch.dtype, dim: int, gram_dtype: ResolvedGramDtype = "float64") -> _Tolerances:
    """Thresholds of a Gram route for inputs of `dtype` (gram_dtype already resolved).

    Two kinds of near-degeneracy are numerical rather than real: eigenvalue
    rounding in the Gram/eigh (absolute in lambda), and the inputs' own
    rounding, which moves singular values by ~eps ||X|| (Weyl; absolute in S).
    """
    sigma_gap = 4.0 * dim * torch.finfo(dtype).eps
    if gram_dtype == "input" and dtype != torch.float64:
        return _Tolerances(max(rank_tolerance(dtype, dim), _INPUT_GRAM_RANK_TOL), _INPUT_GRAM_GAP_TOL, sigma_gap)
    return _Tolerances(rank_tolerance(dtype, dim), _GAP_TOL, sigma_gap)


class SVDFactorizationError(RecsysError):
    """eigh could not factor a history's Gram matrix: almost always because
    the history embeddings hold NaN/inf (a diverged model, e.g. a huge lr)."""


def top_eigh(gram: Tensor) -> tuple[Tensor, Tensor]:
    """All eigenpairs of symmetric (B, D, D) float64 matrices, descending."""
    try:
        lam, e = torch.linalg.eigh(gram)  # (B, D), (B, D, D) ascending
    except torch.linalg.LinAlgError as err:
        if not bool(torch.isfinite(gram).all()):
            raise SVDFactorizationError(
                "SVD-attention: a history's Gram matrix holds NaN or inf values (eigh cannot factor it): the history "
                "embeddings hold NaN or inf (in training: the model diverged; lower train.lr / train.sparse_lr), or "
                "they are too large for a float32 Gram (entries past ~1e19 overflow: gram_dtype float64)"
            ) from err
        raise SVDFactorizationError(f"SVD-attention: eigh did not converge on a history Gram matrix ({err})") from err
    return lam.flip(-1), e.flip(-1)


# Elements per float64 conversion chunk (2 MB; 4096 rows at D = 64). Whole-
# history float64 temporaries are fresh multi-MB allocations that can page-fault
# on every call; one reused chunk buffer does not. The size was chosen by
# timing chunkings at long histories.
_CHUNK_ELEMS = 1 << 18


def gram_matrix(x: Tensor, gram_dtype: ResolvedGramDtype, lengths: list[int] | None = None) -> Tensor:
    """G = X^T X (B, D, D) float64; gram_dtype "float64" or "input" (resolved).

    X is a padded history (B, L, D), or, with `lengths` (B Python ints), the
    jagged rows (sum lengths, D) of B histories back to back (no padding
    exists, so none is masked, copied or multiplied: the ranker's long-history
    path, `jagged_segments`).

    "float64": products in float64, chunk by chunk through one reused buffer.
    "input": one GEMM (per history when jagged) in X's dtype, then cast.
    """
    if lengths is not None:
        return _jagged_gram(x, gram_dtype, lengths)
    if x.dtype == torch.float64 or gram_dtype == "input":
        return (x.mT @ x).to(torch.float64)
    b, length, d = x.shape
    step = max(256, _CHUNK_ELEMS // max(1, b * d))
    gram = torch.zeros(b, d, d, dtype=torch.float64, device=x.device)  # (B, D, D)
    buf = torch.empty(b, min(step, length), d, dtype=torch.float64, device=x.device)  # (B, chunk, D)
    for lo in range(0, length, step):
        c = buf[:, : min(step, length - lo)]  # (B, n, D)
        c.copy_(x[:, lo : lo + step])
        gram.baddbmm_(c.mT, c)
    return gram


def _jagged_gram(x: Tensor, gram_dtype: ResolvedGramDtype, lengths: list[int]) -> Tensor:
    """Jagged rows (sum lengths, D) -> G (B, D, D) float64, one history at a time."""
    d = x.shape[-1]
    gram = torch.zeros(len(lengths), d, d, dtype=torch.float64, device=x.device)  # (B, D, D)
    if x.dtype == torch.float64 or gram_dtype == "input":
        for b, seg in enumerate(torch.split(x, lengths)):
            if seg.shape[0]:
                gram[b] = seg.mT @ seg  # cast on assignment
        return gram
    step = max(256, _CHUNK_ELEMS // max(1, d))
    buf = torch.empty(min(step, max(lengths, default=0)), d, dtype=torch.float64, device=x.device)  # (chunk, D)
    for b, seg in enumerate(torch.split(x, lengths)):
        for lo in range(0, seg.shape[0], step):
            c = buf[: min(step, seg.shape[0] - lo)]  # (n, D)
            c.copy_(seg[lo : lo + step])
            gram[b].addmm_(c.mT, c)
    return gram


def jagged_segments(lengths: Tensor) -> list[int]:
    """int64 lengths (B,) -> the Python ints `gram_matrix` and `compact_tokens` take for jagged rows."""
    return [int(n) for n in lengths.tolist()]


class _GramEigh(torch.autograd.Function):
    """X (B, L, D) -> S (B, K), V (B, D, K), float64: top-K singular pairs via eigh(X^T X).

    Backward goes straight to X with the robust guards of the module docstring.
    `subspace_only` drops the within-top-K rotation terms, for callers whose
    output depends on V only through span(V).
    """

    @staticmethod
    def forward(ctx, x: Tensor, rank: int, tols: _Tolerances, subspace_only: bool, gram_dtype: str):  # type: ignore[override]
        lam, e = top_eigh(gram_matrix(x, gram_dtype))  # (B, D), (B, D, D)
        ctx.save_for_backward(x, lam, e)
        ctx.rank, ctx.tols, ctx.subspace_only = rank, tols, subspace_only
        s = lam[:, :rank].clamp_min(0).sqrt()  # (B, K)
        return s, e[:, :, :rank].contiguous()

    @staticmethod
    def backward(ctx, g_s: Tensor, g_v: Tensor):  # type: ignore[override]
        x, lam, e = ctx.saved_tensors
        r, tols = ctx.rank, ctx.tols
        lam_max = lam[:, :1].clamp_min(0)  # (B, 1)
        # eigenvalues under the rank tolerance are noise: exact zeros, so pairs of them count as degenerate
        lam = torch.where(lam > (tols.rank * tols.rank) * lam_max, lam, torch.zeros((), dtype=lam.dtype))  # (B, D)
        s = lam[:, :r].sqrt()  # (B, K)
        ok = s > 0  # (B, K)
        # dS -> dlambda = dS / (2 S); with dG -> dX this becomes U dS V^T, finite
        g_lam = torch.zeros_like(lam)  # (B, D)
        g_lam[:, :r] = torch.where(ok, g_s / (2 * torch.where(ok, s, torch.ones((), dtype=s.dtype))), 0.0)
        g_e = torch.zeros_like(e)  # (B, D, D)
        g_e[:, :, :r] = g_v
        gap = lam[:, None, :] - lam[:, :, None]  # (B, D, D): lambda_j - lambda_i
        sig = lam.sqrt()  # (B, D)
        sig_gap = sig[:, None, :] - sig[:, :, None]  # (B, D, D)
        safe = (gap.abs() > tols.lam_gap * lam_max[:, :, None]) & (
            sig_gap.abs() > tols.sigma_gap * sig[:, :1, None]
        )  # (B, D, D)
        if ctx.subspace_only:
            safe[:, :r, :r] = False
        f = torch.where(safe, 1.0 / torch.where(safe, gap, torch.ones((), dtype=gap.dtype)), 0.0)  # (B, D, D)
        inner = f * (e.mT @ g_e) + torch.diag_embed(g_lam)  # (B, D, D)
        g_gram = e @ inner @ e.mT  # (B, D, D)
        return _times(x, g_gram + g_gram.mT), None, None, None, None  # (B, L, D)


def _times(x: Tensor, w: Tensor, lengths: list[int] | None = None) -> Tensor:
    """X (B, L, D) @ W (B, D, D) float64 -> (B, L, D) in X's dtype; with
    `lengths`, jagged rows (sum lengths, D), each history times its own W.

    A float64 X is multiplied in float64. A float32 X is multiplied by W
    rounded to float32: the gradient is returned in float32 anyway, and this
    skips a float64 copy of the whole history (the O(L D) part of backward).
    """
    w = w.to(x.dtype)
    if lengths is None:
        return x @ w
    out = torch.empty_like(x)  # (sum lengths, D)
    for b, (seg, dst) in enumerate(zip(torch.split(x, lengths), torch.split(out, lengths))):
        torch.mm(seg, w[b], out=dst)
    return out


def _noise_weights(s_all: Tensor, floor: float | Tensor) -> Tensor:
    """clip(s / (floor s_1) - 1, 0, 1) (B, D): 0 for singular values at or
    under `floor` s_1 (the Gram's rounding, not the history), 1 from twice it,
    linear between (continuous); all 1 when floor is 0. `floor`: a number, or
    one per user (B, 1)."""
    if not isinstance(floor, Tensor) and floor <= 0:
        return torch.ones_like(s_all)
    unit = floor * s_all[:, :1]  # (B, 1)
    ok = unit > 0
    return torch.where(ok, (s_all / torch.where(ok, unit, torch.ones((), dtype=s_all.dtype)) - 1).clamp(0.0, 1.0), 1.0)


def taper_weights(s_all: Tensor, rank: int, taper: float, floor: float | Tensor = 0.0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Compact's spectrum h_i = s_i w_i over ALL D singular values s_all (B, D), descending.

    R < D: w_i = clip(1/2 + (s_i - m) / (2 taper s_1), 0, 1) with m = (s_R +
    s_{R+1}) / 2, the midpoint of the cutoff gap: directions above the gap by
    taper s_1 keep weight 1, below it by as much get 0, and at a crossing
    (s_R = s_{R+1}) both get 1/2, so the swap is continuous. R = D: w = 1
    (M = (X^T X)^(1/2)). `floor` (relative to s_1, the Gram route's rank
    tolerance): w is also multiplied by `_noise_weights`, so directions the
    history lacks, whose singular values are the Gram's rounding (~3e-4 s_1
    for a float32 Gram, ~1e-8 for float64), get no weight; without it a
    history of rank below R served on the float32 Gram differed from the
    float64 path by ~1e-4 relative. Returns h, w, the ramp mask (0 < w < 1 of
    the taper) and m (B, 1).
    """
    d = s_all.shape[-1]
    noise = _noise_weights(s_all, floor)  # (B, D)
    if rank >= d:
        return s_all * noise, noise, torch.zeros_like(s_all, dtype=torch.bool), s_all.new_zeros(s_all.shape[0], 1)
    mid = (s_all[:, rank - 1 : rank] + s_all[:, rank : rank + 1]) / 2  # (B, 1)
    scale = 2 * taper * s_all[:, :1]  # (B, 1)
    ramp = 0.5 + (s_all - mid) / torch.where(scale > 0, scale, torch.ones((), dtype=s_all.dtype))  # (B, D)
    ramp = torch.where(scale > 0, ramp, torch.zeros((), dtype=s_all.dtype))
    w = ramp.clamp(0.0, 1.0) * noise  # (B, D)
    return s_all * w, w, (ramp > 0) & (ramp < 1), mid


def _tapered_root(x: Tensor, rank: int, taper: float, tols: _Tolerances, gram_dtype: ResolvedGramDtype,
                  lengths: list[int] | None) -> tuple[Tensor, tuple[Tensor, ...]]:
    """M = E diag(h(s)) E^T (B, D, D) float64, and (lam, E, s, h, w, ramp mask, m) for the backward."""
    lam, e = top_eigh(gram_matrix(x, gram_dtype, lengths))  # (B, D), (B, D, D)
    lam = lam.clamp_min(0)
    s_all = lam.sqrt()  # (B, D)
    h, w, in_ramp, mid = taper_weights(s_all, rank, taper, tols.rank)  # (B, D) x 3, (B, 1)
    return (e * h[:, None, :]) @ e.mT, (lam, e, s_all, h, w, in_ramp, mid)  # (B, D, D)


class _TaperedRoot(torch.autograd.Function):
    """X (B, L, D) -> M = E diag(h(s)) E^T (B, D, D) float64, compact's tokens.

    Backward: Daleckii-Krein for the spectral function phi(lambda) = h(sqrt
    lambda) at fixed (s_1, m), plus the terms through s_1 and the cutoff
    midpoint m = (s_R + s_{R+1}) / 2 (d s_k / dX = u_k v_k^T). Divided
    differences of near-equal eigenvalues use the mean derivative, so nothing
    divides by ~0.
    """

    @staticmethod
    def forward(ctx, x: Tensor, rank: int, taper: float, tols: _Tolerances, gram_dtype: str,  # type: ignore[override]
                lengths: list[int] | None):
        m, saved = _tapered_root(x, rank, taper, tols, gram_dtype, lengths)
        ctx.save_for_backward(x, *saved)
        ctx.rank, ctx.taper, ctx.tols, ctx.lengths = rank, taper, tols, lengths
        return m

    @staticmethod
    def backward(ctx, g_m: Tensor):  # type: ignore[override]
        x, lam, e, s_all, h, w, in_ramp, mid = ctx.saved_tensors
        r, taper = ctx.rank, ctx.taper
        d = lam.shape[1]
        s1 = s_all[:, :1]  # (B, 1)
        scale = 2 * taper * s1  # (B, 1): the ramp's width in s
        inv_scale = torch.where(scale > 0, 1.0 / torch.where(scale > 0, scale, torch.ones((), dtype=s1.dtype)), 0.0)
        ramp = in_ramp.to(torch.float64)  # (B, D)
        # phi'(lambda) = h'(s) / (2 s), h' = w + s [ramp] / scale at fixed (s_1, m). Singular values
        # under the rank tolerance are Gram rounding (~1e-8 s_1 for a zero one): w / (2 s) would turn
        # that noise into ~1e8, so they count as exact zeros with a zero derivative, as in _GramEigh
        real = s_all > ctx.tols.rank * s1  # (B, D)
        safe_s = torch.where(real, s_all, torch.ones((), dtype=s_all.dtype))
        dphi = torch.where(real, w / (2 * safe_s), 0.0) + ramp * inv_scale / 2  # (B, D)
        gap = lam[:, :, None] - lam[:, None, :]  # (B, D, D)
        far = gap.abs() > ctx.tols.lam_gap * lam[:, :1, None]  # (B, D, D)
        divided = (h[:, :, None] - h[:, None, :]) / torch.where(far, gap, torch.ones((), dtype=gap.dtype))
        k = torch.where(far, divided, (dphi[:, :, None] + dphi[:, None, :]) / 2)  # (B, D, D)
        a = e.mT @ ((g_m + g_m.mT) / 2).to(torch.float64) @ e  # (B, D, D)
        # dL/dX = X W: every term below is X times a D x D matrix, so W is
        # summed first and X is touched once (one (L, D) x (D, D) product)
        w_x = 2 * (e @ (k * a) @ e.mT)  # (B, D, D)
        if r >= d:
            return _times(x, w_x, ctx.lengths), None, None, None, None, None
        # through m and s_1: dh_i/dm = -s_i [ramp] / scale; dh_i/ds_1 = -s_i [ramp] (s_i - m) 2 taper / scale^2
        a_diag = a.diagonal(dim1=1, dim2=2)  # (B, D)
        c_mid = -(a_diag * ramp * s_all).sum(-1) * inv_scale[:, 0]  # (B,)
        c_s1 = -(a_diag * ramp * s_all * (s_all - mid)).sum(-1) * 2 * taper * inv_scale[:, 0] ** 2  # (B,)
        tol = ctx.tols.rank
        for idx, c in ((0, c_s1), (r - 1, c_mid / 2), (r, c_mid / 2)):
            vk = e[:, :, idx]  # (B, D)
            sk = s_all[:, idx]  # (B,)
            ok = sk > tol * s1[:, 0]  # a zero singular value's subgradient: 0
            coef = torch.where(ok, c / torch.where(ok, sk, torch.ones((), dtype=sk.dtype)), 0.0)  # (B,)
            w_x = w_x + coef[:, None, None] * vk[:, :, None] * vk[:, None, :]  # X v_k v_k^T = s_k u_k v_k^T
        return _times(x, w_x, ctx.lengths), None, None, None, None, None


def factorize(
    x: Tensor, rank: int, subspace_only: bool = False, gram_dtype: ResolvedGramDtype = "float64"
) -> tuple[Tensor, Tensor]:
    """Masked history (B, L, D) -> S (B, K), V (B, D, K) float64 (any signs); gram_dtype resolved."""
    tols = _tolerances(x.dtype, x.shape[-1], gram_dtype)
    return _GramEigh.apply(x, rank, tols, subspace_only, gram_dtype)


def compact_tokens(x: Tensor, rank: int, taper: float, gram_dtype: ResolvedGramDtype,
                   lengths: list[int] | None = None) -> Tensor:
    """M (B, D, D) float64 of a masked history (B, L, D), or of jagged rows
    (sum lengths, D) with `lengths` (`jagged_segments`); gram_dtype resolved.
    Differentiable in X."""
    tols = _tolerances(x.dtype, x.shape[-1], gram_dtype)
    if not (torch.is_grad_enabled() and x.requires_grad):
        # serving / evaluation: the same forward without the autograd Function's bookkeeping
        return _tapered_root(x, rank, taper, tols, gram_dtype, lengths)[0]
    return _TaperedRoot.apply(x, rank, taper, tols, gram_dtype, lengths)


def tokens_from_spectrum(s_all: Tensor, v_all: Tensor, rank: int, taper: float, floor: float | Tensor = 0.0) -> Tensor:
    """M = V diag(h(S)) V^T (B, D, D) from all singular values S (B, D) and vectors V (B, D, D);
    `floor`: the rank tolerance of the route that produced S (`taper_weights`)."""
    h, _, _, _ = taper_weights(s_all, rank, taper, floor)  # (B, D)
    return (v_all * h[:, None, :]) @ v_all.mT  # (B, D, D)
