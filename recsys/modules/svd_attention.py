"""SVD-attention over long user histories (after the SOLAR paper).

Target attention lets each of C candidates attend over a user's L history
events: O(C L D) time and a (C, L) logits tensor per user, which dominates
serving for long histories. Here each history is summarised by a rank-R
truncated SVD, X ~ U S V^T, computed from the D x D Gram matrix X^T X.

Shape legend:
    B  users (requests) in the batch
    L  history length, padded; per-user valid length in `lengths` (B,)
    C  candidates per user
    D  embedding dim
    R  rank (number of interest tokens)

Factorisation (`svd_factors`): G = X^T X over the valid rows in float64,
O(L D^2) (float32 histories are converted chunk by chunk through one reused
buffer; `gram_dtype="input"` opts into a float32 GEMM instead, ~3x faster,
see `SVDAttentionConfig`); `torch.linalg.eigh(G)` in float64, batched over
users, O(D^3) (a float32 eigh of a 64x64 matrix is ~400x slower on this CPU,
see NOTES.md);
S = sqrt(top-R eigenvalues), V = their eigenvectors, U = X V S^-1 (O(L D R),
only when asked for). Signs are canonical: each (u_r, v_r) is flipped so that
v_r . (X^T 1) >= 0, i.e. each column of U sums to >= 0 and each interest token
points along the history's own mass (ties, e.g. a zero-mass history, fall back
to the sign of v_r's largest entry). Singular values below
`rank_tolerance(dtype, D) * S_max` count as zero: their U columns are zero, and
their tokens are masked out of the compact softmax.

Modes, with Qp = Q W_Q:
- "exact": logits = (Qp W_K^T V S) U^T / sqrt(D), masked softmax over all L
  events, out = ((P U) S)(V^T W_V). U S is formed as X V (equal when no singular
  value is clamped, and it needs no S^-1). This is target attention on the
  truncated history X_R = X V V^T, so it is LOSSLESS (equal to
  `reference_target_attention`) whenever rank(X) <= R; with R >= D it skips
  the factorisation (X_R = X). Cost O(L D^2 + D^3 + L D R + C L R) instead of
  O(L D^2 + C L D): it still builds the (C, L) logits, the saving is D/R in the
  two big products, not in the softmax.
  X-gradient: truncation drops the first-order part of dX orthogonal to both
  the column space and the top-R row space of X, (I - P_U) dX (I - P_V), so the
  X-gradient equals the reference's only when R >= D (V V^T = I); for R < D it
  equals the reference's gradient projected onto the tangent space of rank-R
  matrices at X, P_U G + G P_V - P_U G P_V. Gradients wrt Q and the projections
  match the reference whenever the output does.
- "compact": R interest tokens Z = S V^T (R x D); out = softmax(Qp (Z W_K)^T /
  sqrt(D)) Z W_V, softmax over the R tokens. Cost O(L D^2) for the Gram +
  O(D^3) for eigh + O(R D^2 + C D^2 + C R D) for the attention; U is never
  formed and no (C, L) or (L, L) tensor exists. From an `IncrementalSVDState`
  the Gram is already summed, so a request costs O(D^3 + C R D) whatever L is.
  What compact preserves: the history's second moment X^T X restricted to the
  top-R subspace, Z^T Z = V S^2 V^T, i.e. the principal interest directions
  with their energy (plus, through the sign rule, which way each points
  relative to the history's mass X^T 1). What it does not preserve: per-event
  identity (softmax is over R tokens, not L events, so a candidate cannot pick
  out one past event); it is NOT equal to target attention in general, not
  even at full rank R = D (different softmax, different value vectors); it is
  a bag of events, order-free; duplicate events weigh by energy (norm squared
  adds up), not by count; and the scale of Z grows like sqrt(L) (energy sums
  over events) unless `normalize_tokens` divides Z by sqrt(length), which
  makes the tokens root-mean-square energies comparable across history
  lengths. It is an approximation with its own semantics, not a fast exact op.

Gradients: eigh's backward has 1/(lambda_i - lambda_j) terms. `_GramEigh` is a
custom autograd function on X (not on G) that zeroes the term where
|lambda_i - lambda_j| <= 1e-10 lambda_max (Gram rounding) or |S_i - S_j| <=
4 D eps(input dtype) S_max (input rounding: float32 inputs cannot resolve
closer singular values) -- the "robust differentiable SVD" guard -- treats
eigenvalues below the rank tolerance as exact zeros, and maps
dS to dX as U dS V^T with S^-1 clamped to 0 for zero singular values; so
gradients stay finite on rank-deficient and repeated-singular-value inputs.
Exact mode depends on V only through span(V), so its backward also drops the
within-subspace rotation terms (they cancel exactly in theory and only
amplify rounding when two kept singular values are close).

Float32 inputs work: the Gram (by default) and eigh run in float64, results
are cast back. Padding (positions >= length) is replaced by zeros before any
arithmetic, so garbage there, even NaN, reaches neither outputs nor gradients.
An empty history gives a zero output (never NaN) in every mode: masked logits
take the most negative finite value, so its softmax averages zero vectors.

Measured here (2 shared cores, D = 64, R = 32, C = 1000, one user per call;
`python -m recsys.bench attention`): at L = 10k the reference takes ~75-80 ms
and compact ~3.3-4.5 ms (~18-23x): the float64 Gram alone is ~1.6 ms, so 50x
is out of reach with it; gram_dtype="input" gets ~1.7-3.4 ms (~23-45x). From
an `IncrementalSVDState` a request is ~1.4 ms whatever L (~250-280x at
L = 50k). About half of the reference's time is page faults on its fresh
(C, L) buffers; with an allocator that keeps memory it runs ~2x faster and
these ratios roughly halve (see the benchmark's --malloc-keep).

Example:
    >>> att = SVDAttention(SVDAttentionConfig(dim=8, rank=4, mode="compact"))
    >>> out = att(torch.randn(2, 30, 8), torch.tensor([30, 7]), torch.randn(2, 5, 8))
    >>> out.shape
    torch.Size([2, 5, 8])
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from features.errors import RecsysError

MODES = ("exact", "compact")
GRAM_DTYPES = ("float64", "input")

# Eigenvalue pairs closer than this fraction of lambda_max are treated as
# degenerate in the backward: their coupling term is dropped instead of
# divided by ~0. A float64 Gram resolves eigenvalues to ~D eps64 lambda_max.
_GAP_TOL = 1e-10
# A float32 Gram product carries ~1e-7 relative error (measured ~1e-8
# lambda_max on eigenvalues at L = 10k..50k), so its thresholds sit higher.
_INPUT_GRAM_RANK_TOL = 1e-3
_INPUT_GRAM_GAP_TOL = 1e-6


@dataclass(frozen=True)
class SVDAttentionConfig:
    """Config of `SVDAttention`.

    dim: D, the embedding dim of history events and candidate queries.
    rank: R, the number of singular directions kept, 1 <= rank <= dim.
    mode: "exact" (lossless when rank(X) <= R) or "compact" (R interest tokens).
    normalize_tokens: compact only; divide Z = S V^T by sqrt(history length), so
        token scale does not grow with L.
    gram_dtype: "float64" (default) forms X^T X in float64. "input" forms it in
        the history's own dtype (float32 GEMM, ~3x faster at D = 64 on this CPU)
        and still runs eigh in float64; G then carries ~1e-7 relative error, so
        singular values below 1e-3 S_max count as zero and eigen-gaps below
        1e-6 lambda_max as degenerate. For serving float32 histories; keep
        "float64" for training and for rank-deficiency-sensitive uses.
    """

    dim: int
    rank: int = 32
    mode: str = "compact"
    normalize_tokens: bool = False
    gram_dtype: str = "float64"

    def __post_init__(self) -> None:
        if not isinstance(self.dim, int) or self.dim < 1:
            raise ValueError(f"dim must be a positive int, got {self.dim!r}")
        if not isinstance(self.rank, int) or not 1 <= self.rank <= self.dim:
            raise ValueError(f"rank must be an int with 1 <= rank <= dim={self.dim}, got {self.rank!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.gram_dtype not in GRAM_DTYPES:
            raise ValueError(f"gram_dtype must be one of {GRAM_DTYPES}, got {self.gram_dtype!r}")


@dataclass(frozen=True)
class SVDFactors:
    """Per-user rank-R factors of the valid history rows, X ~ U S V^T.

    U: (B, L, R), zero on padding; None when only compact attention is needed.
    S: (B, R), descending, >= 0.
    V: (B, D, R), orthonormal columns.
    """

    U: Tensor | None
    S: Tensor
    V: Tensor

    def detach(self) -> SVDFactors:
        return SVDFactors(None if self.U is None else self.U.detach(), self.S.detach(), self.V.detach())


def rank_tolerance(dtype: torch.dtype, dim: int) -> float:
    """Singular values below this fraction of the largest count as zero.

    The Gram route resolves singular values only down to ~sqrt(eps64) ~ 1e-8 of
    the largest (eigenvalue error ~ D eps64 lambda_max), so 1e-6 is the floor;
    float32 inputs carry their own rounding noise at ~D eps32.
    """
    # capped so that half-precision inputs (eps ~ 1e-3) do not mask every token
    return min(max(1e-6, 4.0 * dim * torch.finfo(dtype).eps), 1e-3)


class _Tolerances(NamedTuple):
    rank: float  # S_r <= rank * S_max counts as zero
    lam_gap: float  # |lambda_i - lambda_j| <= lam_gap * lambda_max: degenerate (Gram rounding)
    sigma_gap: float  # |S_i - S_j| <= sigma_gap * S_max: degenerate (input rounding)


def _tolerances(dtype: torch.dtype, dim: int, gram_dtype: str = "float64") -> _Tolerances:
    """Thresholds of a Gram route for inputs of `dtype`.

    Two kinds of near-degeneracy are numerical rather than real: eigenvalue
    rounding in the Gram/eigh (absolute in lambda), and the inputs' own
    rounding, which moves singular values by ~eps ||X|| (Weyl; absolute in S).
    A lambda-only threshold would either miss float32 input noise between equal
    singular values or swallow real small singular values next to zero ones.
    """
    sigma_gap = 4.0 * dim * torch.finfo(dtype).eps
    if gram_dtype == "input" and dtype != torch.float64:
        return _Tolerances(max(rank_tolerance(dtype, dim), _INPUT_GRAM_RANK_TOL), _INPUT_GRAM_GAP_TOL, sigma_gap)
    return _Tolerances(rank_tolerance(dtype, dim), _GAP_TOL, sigma_gap)


def _valid_mask(lengths: Tensor, length: int) -> Tensor:
    return torch.arange(length, device=lengths.device)[None, :] < lengths[:, None]  # (B, L)


def _masked_history(history: Tensor, lengths: Tensor) -> Tensor:
    """Zero the padding; skipped when nothing is padded (a full pass over L D saved)."""
    if history.shape[1] == 0 or bool((lengths >= history.shape[1]).all()):
        return history
    valid = _valid_mask(lengths, history.shape[1])  # (B, L)
    # where, not multiply: 0 * NaN is NaN, and where's backward sends zero to padding
    return torch.where(valid[..., None], history, torch.zeros((), dtype=history.dtype))  # (B, L, D)


class SVDFactorizationError(RecsysError):
    """eigh could not factor a history's Gram matrix: almost always because
    the history embeddings hold NaN/inf (a diverged model, e.g. a huge lr)."""


def _top_eigh(gram: Tensor) -> tuple[Tensor, Tensor]:
    """All eigenpairs of symmetric (B, D, D) float64 matrices, descending."""
    try:
        lam, e = torch.linalg.eigh(gram)  # (B, D), (B, D, D) ascending
    except torch.linalg.LinAlgError as err:
        if not bool(torch.isfinite(gram).all()):
            raise SVDFactorizationError(
                "SVD-attention got history embeddings with NaN or inf values (eigh cannot factor them): "
                "the model diverged; lower train.lr / train.sparse_lr"
            ) from err
        raise SVDFactorizationError(f"SVD-attention: eigh did not converge on a history Gram matrix ({err})") from err
    return lam.flip(-1), e.flip(-1)


def _canonical_signs(v: Tensor, mass: Tensor) -> Tensor:
    """+-1 per column of V (B, D, R) so that v_r . mass >= 0; mass = X^T 1 (B, D).

    Both the rule and its fallback flip with v_r, so any sign-flipped input maps
    to the same output.
    """
    proj = (v * mass[:, :, None]).sum(dim=1)  # (B, R)
    # a zero-mass history leaves proj ~ 0: use the sign of v_r's largest entry
    fallback = v.gather(1, v.abs().argmax(dim=1, keepdim=True))[:, 0, :]  # (B, R)
    key = torch.where(proj.abs() > 1e-9 * mass.norm(dim=-1, keepdim=True), proj, fallback)  # (B, R)
    return torch.where(key >= 0, 1.0, -1.0).to(v.dtype)  # (B, R)


# Elements per float64 conversion chunk (2 MB; 4096 rows at D = 64). Whole-
# history float64 temporaries are fresh multi-MB allocations that can page-fault
# on every call (~1 us per fault here; measured 2,468 faults, +3 ms per call at
# L = 10k with two such temporaries); one reused chunk buffer does not, and
# 4096-row GEMMs were the fastest chunking measured at L = 10k and 50k.
_CHUNK_ELEMS = 1 << 18


def _mass64(x: Tensor) -> Tensor:
    """X^T 1 (B, D) in float64 without a full float64 copy of X (B, L, D).

    Chunks go through one reused float64 buffer: `sum(dtype=float64)` on the
    float32 tensor measured ~10x slower (1.2 ms vs ~0.1 ms at L = 10k, 1 thread).
    """
    if x.dtype == torch.float64:
        return x.sum(dim=1)
    b, length, d = x.shape
    step = max(256, _CHUNK_ELEMS // max(1, b * d))
    mass = torch.zeros(b, d, dtype=torch.float64, device=x.device)  # (B, D)
    buf = torch.empty(b, min(step, length), d, dtype=torch.float64, device=x.device)  # (B, chunk, D)
    for lo in range(0, length, step):
        c = buf[:, : min(step, length - lo)]  # (B, n, D)
        c.copy_(x[:, lo : lo + step])
        mass += c.sum(dim=1)
    return mass


def _gram_mass(x: Tensor, gram_dtype: str) -> tuple[Tensor, Tensor]:
    """G = X^T X (B, D, D) and mass = X^T 1 (B, D), both float64, for X (B, L, D).

    gram_dtype "float64": products and sums in float64, chunk by chunk through
    one reused buffer. "input": one GEMM in X's dtype, then cast.
    """
    if x.dtype == torch.float64 or gram_dtype == "input":
        return (x.mT @ x).to(torch.float64), _mass64(x)
    b, length, d = x.shape
    step = max(256, _CHUNK_ELEMS // max(1, b * d))
    gram = torch.zeros(b, d, d, dtype=torch.float64, device=x.device)  # (B, D, D)
    mass = torch.zeros(b, d, dtype=torch.float64, device=x.device)  # (B, D)
    buf = torch.empty(b, min(step, length), d, dtype=torch.float64, device=x.device)  # (B, chunk, D)
    for lo in range(0, length, step):
        c = buf[:, : min(step, length - lo)]  # (B, n, D)
        c.copy_(x[:, lo : lo + step])
        gram.baddbmm_(c.mT, c)
        mass += c.sum(dim=1)
    return gram, mass


class _GramEigh(torch.autograd.Function):
    """X (B, L, D) -> S (B, R), V (B, D, R), mass X^T 1 (B, D), float64: top-R singular pairs via eigh(X^T X).

    The Gram is float64 unless the caller opted into gram_dtype="input"; eigh
    always runs in float64. Backward goes straight to X with the robust guards
    described in the module docstring. `subspace_only` drops the within-top-R
    rotation terms, for callers whose output depends on V only through span(V).
    mass (for the sign rule) is not differentiable.
    """

    @staticmethod
    def forward(ctx, x: Tensor, rank: int, tols: _Tolerances, subspace_only: bool, gram_dtype: str):  # type: ignore[override]
        gram, mass = _gram_mass(x, gram_dtype)  # (B, D, D), (B, D)
        lam, e = _top_eigh(gram)  # (B, D), (B, D, D)
        ctx.save_for_backward(x, lam, e)
        ctx.rank, ctx.tols, ctx.subspace_only = rank, tols, subspace_only
        ctx.mark_non_differentiable(mass)
        s = lam[:, :rank].clamp_min(0).sqrt()  # (B, R)
        return s, e[:, :, :rank].contiguous(), mass

    @staticmethod
    def backward(ctx, g_s: Tensor, g_v: Tensor, _g_mass: Tensor):  # type: ignore[override]
        x, lam, e = ctx.saved_tensors
        r, tols = ctx.rank, ctx.tols
        tol = tols.rank
        b, d = lam.shape
        lam_max = lam[:, :1].clamp_min(0)  # (B, 1)
        # eigenvalues under the rank tolerance are noise: make them exact zeros so
        # that pairs of them count as degenerate below
        lam = torch.where(lam > (tol * tol) * lam_max, lam, torch.zeros((), dtype=lam.dtype))  # (B, D)
        s = lam[:, :r].sqrt()  # (B, R)
        ok = s > 0  # (B, R)
        # dS -> dlambda = dS / (2 S); with dG -> dX this becomes U dS V^T, finite;
        # zero singular values get a zero (sub)gradient
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
        g_x = x.to(torch.float64) @ (g_gram + g_gram.mT)  # (B, L, D)
        return g_x.to(x.dtype), None, None, None, None


def _factorize(
    x: Tensor, rank: int, subspace_only: bool = False, gram_dtype: str = "float64"
) -> tuple[Tensor, Tensor]:
    """Masked history (B, L, D) -> S (B, R), V (B, D, R) float64, canonical signs."""
    tols = _tolerances(x.dtype, x.shape[-1], gram_dtype)
    s, v, mass = _GramEigh.apply(x, rank, tols, subspace_only, gram_dtype)  # (B, R), (B, D, R), (B, D)
    with torch.no_grad():
        sign = _canonical_signs(v, mass)  # (B, R)
    return s, v * sign[:, None, :]


def _inverse_or_zero(s: Tensor, rel_tol: float) -> Tensor:
    ok = s > rel_tol * s.amax(dim=-1, keepdim=True)  # (B, R); all False when S_max = 0
    return torch.where(ok, 1.0 / torch.where(ok, s, torch.ones((), dtype=s.dtype)), 0.0)  # (B, R)


def svd_factors(history: Tensor, lengths: Tensor, rank: int) -> SVDFactors:
    """Rank-R truncated SVD of each user's valid rows, canonical signs, differentiable.

    history (B, L, D), lengths (B,) -> U (B, L, R), S (B, R), V (B, D, R) in
    history's dtype (computed in float64). Cost O(L D^2 + D^3 + L D R).
    """
    if not 1 <= rank <= history.shape[-1]:
        raise ValueError(f"rank must satisfy 1 <= rank <= D={history.shape[-1]}, got {rank}")
    x = _masked_history(history, lengths)  # (B, L, D)
    s, v = _factorize(x, rank)  # (B, R), (B, D, R)
    inv = _inverse_or_zero(s, rank_tolerance(history.dtype, history.shape[-1]))  # (B, R)
    u = (x.to(torch.float64) @ v) * inv[:, None, :]  # (B, L, R)
    dt = history.dtype
    return SVDFactors(u.to(dt), s.to(dt), v.to(dt))


def history_fingerprint(history: Tensor, length: int) -> tuple[int, str]:
    """(length, short hash of the valid rows) of one user's history (L, D): a cheap cache key.

    O(L D) bytes hashed, versus O(L D^2) for the factorisation it guards; a
    caller with a version counter can use (length, version) instead.
    """
    rows = history[:length].detach().to("cpu").contiguous()
    digest = hashlib.blake2b(rows.view(torch.uint8).numpy().tobytes(), digest_size=12).hexdigest()
    return length, digest


class FactorCache:
    """Per-user SVD factors, reused while the history is unchanged.

    One entry per user key: (fingerprint, rank) -> detached factors (float64-
    derived, stored in the history's dtype). A request with the same fingerprint
    and rank is a hit; a new fingerprint recomputes and replaces the entry.
    Least recently used users are evicted beyond `max_entries`. `keep_u=False`
    stores only S and V (all that compact needs; exact recomputes U S = X V).

    Counters `hits` and `misses` count lookups.
    """

    def __init__(self, max_entries: int = 10_000, keep_u: bool = True) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        self.max_entries = max_entries
        self.keep_u = keep_u
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[Hashable, tuple[Hashable, int, SVDFactors]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()

    def get(self, user_key: Hashable, fingerprint: Hashable, history: Tensor, length: int, rank: int) -> SVDFactors:
        """Factors of one user's history (L, D): U (1, length, R) or None, S (1, R), V (1, D, R)."""
        entry = self._entries.get(user_key)
        if entry is not None and entry[0] == fingerprint and entry[1] == rank:
            self.hits += 1
            self._entries.move_to_end(user_key)
            return entry[2]
        self.misses += 1
        with torch.no_grad():
            f = svd_factors(history[None, :length], torch.tensor([length]), rank)
        factors = SVDFactors(f.U if self.keep_u else None, f.S, f.V)
        self._entries[user_key] = (fingerprint, rank, factors)
        self._entries.move_to_end(user_key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return factors

    def get_batch(
        self,
        user_keys: Sequence[Hashable],
        fingerprints: Sequence[Hashable],
        history: Tensor,
        lengths: Tensor,
        rank: int,
    ) -> SVDFactors:
        """Factors for a padded batch (B, L, D): U zero-padded to (B, L, R) (or None)."""
        got = [
            self.get(k, fp, history[i], int(lengths[i]), rank)
            for i, (k, fp) in enumerate(zip(user_keys, fingerprints, strict=True))
        ]
        s = torch.cat([f.S for f in got])  # (B, R)
        v = torch.cat([f.V for f in got])  # (B, D, R)
        if not self.keep_u:
            return SVDFactors(None, s, v)
        u = history.new_zeros(history.shape[0], history.shape[1], rank)  # (B, L, R)
        for i, f in enumerate(got):
            assert f.U is not None
            u[i, : f.U.shape[1]] = f.U[0]
        return SVDFactors(u, s, v)


class IncrementalSVDState:
    """Running sums G = X^T X (D, D) and mass = X^T 1 (D,) of one user's events, float64.

    Compact attention needs nothing else, and both are sums over events: an
    append costs O(D^2) per event, and a request costs O(D^3 + C R D) whatever
    the history length. `count` doubles as a version number for caches.
    Holds no gradient (serving state).
    """

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.gram = torch.zeros(dim, dim, dtype=torch.float64)  # (D, D)
        self.mass = torch.zeros(dim, dtype=torch.float64)  # (D,)
        self.count = 0
        self.dtype = torch.float32  # dtype of the events seen, for the rank tolerance

    @classmethod
    def from_history(cls, history: Tensor, length: int | None = None) -> IncrementalSVDState:
        """State of one user's history (L, D), valid rows [:length]."""
        state = cls(history.shape[-1])
        return state.append(history if length is None else history[:length])

    def append(self, events: Tensor) -> IncrementalSVDState:
        """Add events (n, D) or (D,); returns self."""
        if events.dim() == 1:
            events = events[None]
        if events.shape[-1] != self.dim:
            raise ValueError(f"events have dim {events.shape[-1]}, state has {self.dim}")
        with torch.no_grad():
            e = events.detach().to(torch.float64)  # (n, D)
            self.gram += e.mT @ e
            self.mass += e.sum(dim=0)
        self.count += events.shape[0]
        self.dtype = events.dtype
        return self


def _compact_attention(
    queries: Tensor, z: Tensor, token_valid: Tensor, w_q: Tensor, w_k: Tensor, w_v: Tensor
) -> Tensor:
    """softmax(Q W_Q (Z W_K)^T / sqrt(D)) Z W_V over the valid tokens; no valid token -> 0."""
    d = queries.shape[-1]
    # Q (W_Q (Z W_K)^T): O(R D^2 + C D R), where (Q W_Q)(Z W_K)^T would cost O(C D^2)
    logits = queries @ (w_q @ (z @ w_k).mT) / math.sqrt(d)  # (B, C, D) @ (B, D, R) -> (B, C, R)
    # the most negative finite value, not -inf: with no valid token (only when
    # S_max = 0, so every token is the zero vector) the softmax is uniform over
    # zero values and the output is exactly 0 instead of NaN
    logits = logits.masked_fill(~token_valid[:, None, :], torch.finfo(logits.dtype).min)  # (B, C, R)
    return torch.softmax(logits, dim=-1) @ (z @ w_v)  # (B, C, D)


class SVDAttention(nn.Module):
    """Target attention of C candidates over a long history through its rank-R SVD.

    See the module docstring for the modes, their cost and when each is
    lossless. Owns `w_q`, `w_k`, `w_v` (D, D), the same names and shapes as
    `TargetAttention`, so a state_dict copies between the two. Returns (B, C, D).
    """

    def __init__(self, config: SVDAttentionConfig) -> None:
        super().__init__()
        self.config = config
        d = config.dim
        self.w_q = nn.Parameter(torch.empty(d, d))
        self.w_k = nn.Parameter(torch.empty(d, d))
        self.w_v = nn.Parameter(torch.empty(d, d))
        for w in (self.w_q, self.w_k, self.w_v):
            nn.init.xavier_uniform_(w)

    def _check(self, history: Tensor, lengths: Tensor, queries: Tensor) -> None:
        d = self.config.dim
        if history.dim() != 3 or history.shape[-1] != d:
            raise ValueError(f"history must be (B, L, {d}), got {tuple(history.shape)}")
        if queries.dim() != 3 or queries.shape[0] != history.shape[0] or queries.shape[-1] != d:
            raise ValueError(f"queries must be (B={history.shape[0]}, C, {d}), got {tuple(queries.shape)}")
        if lengths.shape != (history.shape[0],):
            raise ValueError(f"lengths must be (B={history.shape[0]},), got {tuple(lengths.shape)}")

    def forward(
        self, history: Tensor, lengths: Tensor, queries: Tensor, factors: SVDFactors | None = None
    ) -> Tensor:
        """history (B, L, D), lengths (B,), queries (B, C, D) -> (B, C, D).

        `factors` (e.g. from a `FactorCache`) skip the factorisation; gradients
        then reach X only through whatever graph the factors carry.
        """
        self._check(history, lengths, queries)
        lengths = lengths.to(history.device)
        x = _masked_history(history, lengths)  # (B, L, D)
        if self.config.mode == "exact":
            return self._exact(x, lengths, queries, factors)
        return self._compact(x, lengths, queries, factors)

    def _exact(self, x: Tensor, lengths: Tensor, queries: Tensor, factors: SVDFactors | None) -> Tensor:
        b, length, d = x.shape
        r = self.config.rank
        if factors is None and r >= d:
            # V V^T = I: the truncation is the identity, so skip the factorisation
            xv, v_wv = x, self.w_v.expand(b, d, d)  # (B, L, D), (B, D, D)
            a = (queries @ self.w_q) @ self.w_k.mT  # (B, C, D)
        else:
            if factors is None:
                _, v64 = _factorize(x, r, subspace_only=True, gram_dtype=self.config.gram_dtype)
                v = v64.to(x.dtype)  # (B, D, R)
                xv = x @ v  # (B, L, R) == U S
            else:
                v = factors.V.to(x.dtype)  # (B, D, R)
                xv = x @ v if factors.U is None else factors.U.to(x.dtype) * factors.S.to(x.dtype)[:, None, :]
            a = queries @ (self.w_q @ (self.w_k.mT @ v))  # (B, C, D) @ (B, D, R) -> (B, C, R): O(D^2 R + C D R)
            v_wv = v.mT @ self.w_v  # (B, R, D)
        logits = a @ xv.mT / math.sqrt(d)  # (B, C, L)
        p = _masked_softmax_events(logits, lengths)  # (B, C, L)
        return (p @ xv) @ v_wv  # (B, C, R) @ (B, R, D) -> (B, C, D)

    def _compact(self, x: Tensor, lengths: Tensor, queries: Tensor, factors: SVDFactors | None) -> Tensor:
        rel_tol = _tolerances(x.dtype, self.config.dim, self.config.gram_dtype).rank
        if factors is None:
            s, v = _factorize(x, self.config.rank, gram_dtype=self.config.gram_dtype)  # (B, R), (B, D, R) float64
        else:
            # re-canonicalise: cached or user-supplied factors may carry any signs
            s, v = factors.S, factors.V  # (B, R), (B, D, R)
            with torch.no_grad():
                sign = _canonical_signs(v.to(torch.float64), _mass64(x))  # (B, R)
            v = v * sign.to(v.dtype)[:, None, :]
        z, valid = self._tokens(s, v, lengths, rel_tol, queries.dtype)  # (B, R, D), (B, R)
        return _compact_attention(queries, z, valid, self.w_q, self.w_k, self.w_v)

    def _tokens(
        self, s: Tensor, v: Tensor, counts: Tensor, rel_tol: float, out_dtype: torch.dtype
    ) -> tuple[Tensor, Tensor]:
        """Interest tokens Z = S V^T (B, R, D) in `out_dtype`, and which of them exist (B, R).

        A token exists when S_r > rel_tol S_max: zero-energy tokens (rank
        deficiency, L < R) would otherwise take softmax mass and dilute the output.
        """
        z = s[:, :, None] * v.mT  # (B, R, D)
        if self.config.normalize_tokens:
            z = z / counts.to(z.dtype).clamp_min(1).sqrt()[:, None, None]
        valid = s > rel_tol * s.amax(dim=-1, keepdim=True)  # (B, R); all False for an empty history
        return z.to(out_dtype), valid

    def forward_from_state(
        self, states: IncrementalSVDState | Sequence[IncrementalSVDState], queries: Tensor
    ) -> Tensor:
        """Compact attention served from running sums: states (B of them), queries (B, C, D) -> (B, C, D).

        Costs O(D^3 + C R D) per user whatever the history length; equals
        `forward` in compact mode on the same events. Gradients reach queries
        and the projections, not the (already summed) history.
        """
        if self.config.mode != "compact":
            raise ValueError(f"forward_from_state serves mode 'compact' only, config has {self.config.mode!r}")
        if isinstance(states, IncrementalSVDState):
            states = [states]
        if queries.dim() == 2:
            queries = queries[None]
        if len(states) != queries.shape[0]:
            raise ValueError(f"{len(states)} states but queries batch is {queries.shape[0]}")
        z, valid = self.state_tokens(states, queries.dtype)  # (B, R, D), (B, R)
        return self.attend_tokens(queries, z, valid)

    def state_tokens(
        self, states: Sequence[IncrementalSVDState], dtype: torch.dtype = torch.float32
    ) -> tuple[Tensor, Tensor]:
        """Interest tokens Z (B, R, D) in `dtype` and their existence mask (B, R) from running sums.

        O(D^3) per user (one batched float64 eigh). Tokens stay valid until the
        next append, so a server may keep them per user and call `attend_tokens`.
        """
        r = self.config.rank
        device = self.w_q.device
        with torch.no_grad():
            gram = torch.stack([st.gram for st in states]).to(device)  # (B, D, D)
            mass = torch.stack([st.mass for st in states]).to(device)  # (B, D)
            counts = torch.tensor([st.count for st in states], device=device)  # (B,)
            lam, e = _top_eigh(gram)  # (B, D), (B, D, D)
            s = lam[:, :r].clamp_min(0).sqrt()  # (B, R)
            v = e[:, :, :r]  # (B, D, R)
            v = v * _canonical_signs(v, mass)[:, None, :]
        # float64 events anywhere in the batch -> the float64 tolerance; the same
        # thresholds as the batch path, so both mask the same tokens
        event_dtype = torch.float64 if any(st.dtype == torch.float64 for st in states) else torch.float32
        rel_tol = _tolerances(event_dtype, self.config.dim, self.config.gram_dtype).rank
        return self._tokens(s, v, counts, rel_tol, dtype)

    def attend_tokens(self, queries: Tensor, tokens: Tensor, token_valid: Tensor) -> Tensor:
        """Compact attention of queries (B, C, D) over given tokens (B, R, D), mask (B, R) -> (B, C, D). O(C R D)."""
        return _compact_attention(queries, tokens, token_valid, self.w_q, self.w_k, self.w_v)


def _masked_softmax_events(logits: Tensor, lengths: Tensor) -> Tensor:
    """Softmax over the L events of (B, C, L) logits with padding masked.

    Padding gets the most negative finite value, not -inf: an empty history
    then softmaxes to uniform weights over padded rows, whose values are zero
    (the history was zeroed there), so its output is exactly 0, never NaN. The
    masking pass (C x L elements) is skipped when nothing is padded.
    """
    length = logits.shape[-1]
    if length == 0 or bool((lengths >= length).all()):
        return torch.softmax(logits, dim=-1)  # (B, C, L)
    valid = _valid_mask(lengths, length)  # (B, L)
    return torch.softmax(logits.masked_fill(~valid[:, None, :], torch.finfo(logits.dtype).min), dim=-1)
