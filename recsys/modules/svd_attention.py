"""SVD-attention over long user histories (after the SOLAR paper).

Target attention lets each of C candidates attend over a user's L history
events: O(C L D) time and a (C, L) logits tensor per user, which dominates
serving for long histories. Here each history is summarised through the
eigendecomposition of its D x D Gram matrix G = X^T X = V S^2 V^T.

Shape legend:
    B  users (requests) in the batch
    L  history length, padded; per-user valid length in `lengths` (B,)
    C  candidates per user
    D  embedding dim
    R  rank

Inputs are checked: history (B, L, D), queries (B, C, D), lengths int64 of
shape (B,) with 0 <= length <= L (anything else raises ValueError). Padding
(positions >= length) is replaced by zeros before any arithmetic, so garbage
there, even NaN, reaches neither outputs nor gradients.

Gram dtype: "float64" forms G in float64; "input" forms it with one GEMM in
the history's dtype (faster, less exact); "auto" (the default) uses "input"
when autograd is off (torch.no_grad / inference_mode: serving, evaluation)
and "float64" when it is on (training). eigh always runs in float64. Either
Gram resolves singular values only down to its rounding (~1e-8 s_1 in
float64, ~3e-4 s_1 in float32): compact gives no weight to those under the
route's rank tolerance (`svd_kernels.rank_floor`; 1e-3 s_1 for a float32
Gram), fading in linearly up to twice it, so a history of rank below R (one
shorter than R, say) serves on the float32 Gram within ~1e-6 of the float64
path. The Gram, eigh and the two differentiable factorisations, with their
backward passes, live in `recsys.modules.svd_kernels`.

Modes, with Qp = Q W_Q:
- "truncated" (formerly "exact", renamed because it is exact only when
  rank(X) <= R): target attention over the L events of X_R = X V_R V_R^T, the
  rank-R truncated SVD. logits = (Qp W_K^T V) (X V)^T / sqrt(D), masked softmax
  over L, out = (P X V)(V^T W_V). Equal to `reference_target_attention`
  whenever rank(X) <= R; with R >= D it skips the factorisation (X_R = X).
  Otherwise it is a truncation: on histories from a trained item table whose
  top-R singular values held 86% of the energy, its relative error was
  0.2-0.5; the benchmark reports it on a low-rank-plus-noise item table. Cost
  O(L D^2 + D^3 + L D R + C L R): it still builds the (C, L) logits. Its
  X-gradient is the reference's projected onto the tangent space of rank-R
  matrices at X, P_U G + G P_V - P_U G P_V (only the span of V matters, so
  rotations within it are dropped).
  It is NOT continuous where the R-th and (R+1)-th singular values cross (the
  kept subspace swaps); only compact is.
- "compact": attention of the C candidates over D tokens, the rows of
      M = V diag(h(s)) V^T,  h(s_i) = s_i * clip(1/2 + (s_i - m) / (2 taper s_1), 0, 1),
  m = (s_R + s_{R+1}) / 2 the midpoint of the cutoff gap (w = 1 when R = D),
  i.e. the PSD square root of the Gram with the spectrum tapered to the top R
  directions: weight 1 above the gap by taper s_1, 0 below it by as much, 1/2
  each for two directions tied at the cutoff. out = softmax(Qp (M
  W_K)^T / sqrt(D)) M W_V, softmax over the D tokens. Cost O(L D^2) for the
  Gram + O(D^3) for eigh + O(C D^2) for the attention; no (C, L) tensor exists.

  Why this form: an earlier version used R tokens s_r v_r, each signed by
  sign(v_r . X^T 1) and hard-cut at rank R. It jumped when that dot product
  crossed 0 (a 2e-16 input change moved the output by 92%), when the R-th and
  (R+1)-th eigenvalues crossed (the kept set swapped), and when two kept
  eigenvalues crossed (eigh's basis of a near-degenerate pair rotates freely).
  M has none of these: each v_i appears as v_i v_i^T (no sign), equal
  eigenvalues get equal weights (M does not depend on the basis chosen inside
  an eigenspace), and the weights of the two directions around the cutoff
  move continuously through 1/2 as their singular values cross. M is a
  spectral function of G with Lipschitz weights, so X -> M is Lipschitz: a
  relative input change eps moves M by O(eps / taper) relative to s_1 (tests:
  < 1e-4 for eps = 1e-6 on inputs built to sit on sign ties and on eigenvalue
  crossings at and inside the cutoff).

  What compact preserves: M^2 = V diag(h^2) V^T, the history's second moment
  X^T X restricted to its top-R principal directions, exactly for directions
  more than taper * s_1 above the cutoff gap, partially for those within it
  (which may include a few just below the cutoff); at R = D, all of X^T X.
  What it does not preserve: per-event identity (the softmax is over D
  tokens, not L events); the sign of the history (X and -X give the same
  output: for the history's mean, pass it separately, e.g. the ranker's
  `history_mean`); event order; it is NOT equal to target attention in
  general, not even at R = D. Duplicate events weigh by energy, not count,
  and M grows like sqrt(L) unless `normalize_tokens` divides it by
  sqrt(length). The price of continuity: near the cutoff the
  rank is soft (a flat spectrum gives every direction weight ~1/2).

Gradients: truncated through `svd_kernels._GramEigh`, compact through
`svd_kernels._TaperedRoot`; both stay finite on rank-deficient and
repeated-singular-value inputs. An empty history gives a zero output (never
NaN) in every mode.

Jagged histories: compact depends on a history only through its Gram, so
`forward_jagged` takes the B histories' rows back to back (sum lengths, D),
as the ranker's TorchRec lookup returns them, and forms each Gram (and, in
backward, each X W) with one GEMM per history: no padded (B, L, D) copy, no
mask pass, no padded gradient. Same numbers as `forward` on the zero-padded
history; the ranker uses it for long histories (`JAGGED_MIN_MEAN_LENGTH`).
Truncated mode needs the per-event logits and has no jagged form.

Serving (per-user factor cache, windowed incremental state, requests served
from it) lives in `recsys.modules.svd_serving`; the plain reference twins in
`recsys.modules.reference_attention`.

Example:
    >>> att = SVDAttention(SVDAttentionConfig(dim=8, rank=4, mode="compact"))
    >>> out = att(torch.randn(2, 30, 8), torch.tensor([30, 7]), torch.randn(2, 5, 8))
    >>> out.shape
    torch.Size([2, 5, 8])
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import Tensor, nn

from recsys.modules.svd_kernels import (
    GRAM_DTYPES,
    GramDtype,
    ResolvedGramDtype,
    SVDFactorizationError,
    compact_tokens,
    factorize,
    gram_matrix,
    jagged_segments,
    rank_floor,
    rank_tolerance,
    taper_weights,
    tokens_from_spectrum,
    top_eigh,
)

# The op's public names; the kernels re-exported here keep their old import path.
__all__ = [
    "GRAM_DTYPES", "MODES", "RENAMED_MODES", "GramDtype", "Mode", "SVDAttention", "SVDAttentionConfig",
    "SVDFactorizationError", "SVDFactors", "check_inputs", "check_jagged_inputs", "compact_tokens", "gram_matrix",
    "rank_tolerance",
    "resolve_gram_dtype", "svd_factors", "taper_weights", "tokens_from_spectrum", "top_eigh",
]

Mode = Literal["truncated", "compact"]
MODES: tuple[Mode, ...] = get_args(Mode)
RENAMED_MODES = {"exact": "truncated"}


@dataclass(frozen=True)
class SVDAttentionConfig:
    """Config of `SVDAttention`.

    dim: D, the embedding dim of history events and candidate queries.
    rank: R, the number of singular directions kept, 1 <= rank <= dim.
    mode: "truncated" (target attention on the rank-R truncation; lossless
        only when rank(X) <= R) or "compact" (tokens = rows of the tapered
        square root M of the Gram; see the module docstring). "exact" is the
        old name of "truncated" and is refused with a pointer to it.
    normalize_tokens: compact only; divide M by sqrt(history length), so token
        scale does not grow with L.
    gram_dtype: "auto" (default): "input" when autograd is off (serving,
        evaluation), "float64" when it is on (training). "float64" always forms
        X^T X in float64; "input" forms it in the history's dtype (one float32
        GEMM, faster), eigh still in float64; G then carries ~1e-7 relative
        error, so the backward's thresholds sit higher.
    taper: compact only; width of the fade-out at the rank cutoff, relative
        to s_1 (0 < taper <= 1). The continuity constant grows like 1 / taper.
    """

    dim: int
    rank: int = 32
    mode: Mode = "compact"
    normalize_tokens: bool = False
    gram_dtype: GramDtype = "auto"
    taper: float = 0.05

    def __post_init__(self) -> None:
        if not isinstance(self.dim, int) or isinstance(self.dim, bool) or self.dim < 1:
            raise ValueError(f"dim must be a positive int, got {self.dim!r}")
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or not 1 <= self.rank <= self.dim:
            raise ValueError(f"rank must be an int with 1 <= rank <= dim={self.dim}, got {self.rank!r}")
        if self.mode in RENAMED_MODES:
            raise ValueError(
                f"mode {self.mode!r} was renamed {RENAMED_MODES[self.mode]!r}: it is target attention on the "
                f"rank-R truncation, exact only when rank(history) <= R"
            )
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.gram_dtype not in GRAM_DTYPES:
            raise ValueError(f"gram_dtype must be one of {GRAM_DTYPES}, got {self.gram_dtype!r}")
        if not 0.0 < self.taper <= 1.0:
            raise ValueError(f"taper must satisfy 0 < taper <= 1, got {self.taper!r}")


def resolve_gram_dtype(gram_dtype: GramDtype) -> ResolvedGramDtype:
    """"auto" -> "input" when autograd is off (no_grad / inference_mode), else "float64"."""
    if gram_dtype != "auto":
        return gram_dtype
    return "float64" if torch.is_grad_enabled() else "input"


def check_inputs(history: Tensor, lengths: Tensor, queries: Tensor | None, dim: int) -> None:
    """ValueError unless history is (B, L, dim), queries (B, C, dim) and lengths int64 (B,) in [0, L]."""
    if history.dim() != 3 or history.shape[-1] != dim:
        raise ValueError(f"history must be (B, L, {dim}), got {tuple(history.shape)}")
    b, length = history.shape[0], history.shape[1]
    if queries is not None and (queries.dim() != 3 or queries.shape[0] != b or queries.shape[-1] != dim):
        raise ValueError(f"queries must be (B={b}, C, {dim}), got {tuple(queries.shape)}")
    if not isinstance(lengths, Tensor) or lengths.dtype != torch.int64:
        got = lengths.dtype if isinstance(lengths, Tensor) else type(lengths).__name__
        raise ValueError(f"lengths must be an int64 tensor, got {got}")
    if lengths.shape != (b,):
        raise ValueError(f"lengths must have shape (B,) = ({b},), got {tuple(lengths.shape)}")
    if b and bool(((lengths < 0) | (lengths > length)).any()):
        bad = lengths[(lengths < 0) | (lengths > length)]
        raise ValueError(
            f"lengths must satisfy 0 <= length <= L={length} (the padded history length); "
            f"got {bad[:5].tolist()} ({bad.numel()} of {b} out of range)"
        )


def check_jagged_inputs(values: Tensor, lengths: Tensor, queries: Tensor, dim: int) -> None:
    """ValueError unless values is (sum lengths, dim), queries (B, C, dim) and lengths int64 (B,) >= 0."""
    if values.dim() != 2 or values.shape[-1] != dim:
        raise ValueError(f"jagged history values must be (sum lengths, {dim}), got {tuple(values.shape)}")
    if not isinstance(lengths, Tensor) or lengths.dtype != torch.int64 or lengths.dim() != 1:
        got = f"{lengths.dtype} {tuple(lengths.shape)}" if isinstance(lengths, Tensor) else type(lengths).__name__
        raise ValueError(f"lengths must be an int64 tensor of shape (B,), got {got}")
    b = lengths.shape[0]
    if queries.dim() != 3 or queries.shape[0] != b or queries.shape[-1] != dim:
        raise ValueError(f"queries must be (B={b}, C, {dim}), got {tuple(queries.shape)}")
    if b and bool((lengths < 0).any()):
        raise ValueError(f"lengths must be >= 0, got {lengths[lengths < 0][:5].tolist()}")
    if int(lengths.sum()) != values.shape[0]:
        raise ValueError(f"lengths sum to {int(lengths.sum())} but the jagged history has {values.shape[0]} rows")


def _valid_mask(lengths: Tensor, length: int) -> Tensor:
    return torch.arange(length, device=lengths.device)[None, :] < lengths[:, None]  # (B, L)


def _masked_history(history: Tensor, lengths: Tensor) -> Tensor:
    """Zero the padding; skipped when nothing is padded (a full pass over L D saved)."""
    if history.shape[1] == 0 or bool((lengths >= history.shape[1]).all()):
        return history
    valid = _valid_mask(lengths, history.shape[1])  # (B, L)
    # where, not multiply: 0 * NaN is NaN, and where's backward sends zero to padding
    return torch.where(valid[..., None], history, torch.zeros((), dtype=history.dtype))  # (B, L, D)


@dataclass(frozen=True)
class SVDFactors:
    """Per-user rank-R factors of the valid history rows, X ~ U S V^T.

    U: (B, L, R), zero on padding; None when only S and V are needed.
    S: (B, R), descending, >= 0.
    V: (B, D, R), orthonormal columns.
    S_all: (B, D), V_all: (B, D, D): the full spectrum. Compact needs it (its
        taper can give directions just past the cutoff a partial weight) and
        refuses factors without it; truncated uses S and V only.
    """

    U: Tensor | None
    S: Tensor
    V: Tensor
    S_all: Tensor | None = None
    V_all: Tensor | None = None

    def detach(self) -> SVDFactors:
        def det(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.detach()

        return SVDFactors(det(self.U), self.S.detach(), self.V.detach(), det(self.S_all), det(self.V_all))


def _canonical_signs(v: Tensor, mass: Tensor) -> Tensor:
    """+-1 per column of V (B, D, R) so that v_r . mass >= 0; mass = X^T 1 (B, D).

    Used only to make `svd_factors` reproducible; no output depends on it.
    """
    proj = (v * mass[:, :, None]).sum(dim=1)  # (B, R)
    # a zero-mass history leaves proj ~ 0: use the sign of v_r's largest entry
    fallback = v.gather(1, v.abs().argmax(dim=1, keepdim=True))[:, 0, :]  # (B, R)
    key = torch.where(proj.abs() > 1e-9 * mass.norm(dim=-1, keepdim=True), proj, fallback)  # (B, R)
    return torch.where(key >= 0, 1.0, -1.0).to(v.dtype)  # (B, R)


def _mass64(x: Tensor) -> Tensor:
    """X^T 1 (B, D) in float64 (for the cosmetic sign rule of `svd_factors`)."""
    return x.to(torch.float64).sum(dim=1)


def _inverse_or_zero(s: Tensor, rel_tol: float) -> Tensor:
    ok = s > rel_tol * s.amax(dim=-1, keepdim=True)  # (B, R); all False when S_max = 0
    return torch.where(ok, 1.0 / torch.where(ok, s, torch.ones((), dtype=s.dtype)), 0.0)  # (B, R)


def svd_factors(history: Tensor, lengths: Tensor, rank: int) -> SVDFactors:
    """Rank-R truncated SVD of each user's valid rows, differentiable, float64 Gram.

    history (B, L, D), lengths (B,) -> U (B, L, R), S (B, R), V (B, D, R) and
    the full spectrum S_all (B, D), V_all (B, D, D) in history's dtype
    (computed in float64). Signs: each column of V_all is flipped so that the
    matching column of U sums to >= 0 (reproducible; no output depends on
    them). O(L D^2 + D^3 + L D R).
    """
    d = history.shape[-1]
    if not 1 <= rank <= d:
        raise ValueError(f"rank must satisfy 1 <= rank <= D={d}, got {rank}")
    check_inputs(history, lengths, None, d)
    x = _masked_history(history, lengths)  # (B, L, D)
    s_all, v_all = factorize(x, d)  # (B, D), (B, D, D)
    with torch.no_grad():
        sign = _canonical_signs(v_all, _mass64(x))  # (B, D)
    v_all = v_all * sign[:, None, :]
    s, v = s_all[:, :rank], v_all[:, :, :rank]
    inv = _inverse_or_zero(s, rank_tolerance(history.dtype, d))  # (B, R)
    u = (x.to(torch.float64) @ v) * inv[:, None, :]  # (B, L, R)
    dt = history.dtype
    return SVDFactors(u.to(dt), s.to(dt), v.to(dt), s_all.to(dt), v_all.to(dt))


def _compact_attention(queries: Tensor, tokens: Tensor, w_q: Tensor, w_k: Tensor, w_v: Tensor) -> Tensor:
    """softmax(Q W_Q (T W_K)^T / sqrt(D)) T W_V over the tokens T (B, N, D); queries (B, C, D)."""
    d = queries.shape[-1]
    # Q (W_Q (T W_K)^T): O(N D^2 + C D N), where (Q W_Q)(T W_K)^T would cost O(C D^2) more;
    # the 1/sqrt(D) scales the (B, D, N) factor, not the (B, C, N) logits
    logits = queries @ (w_q @ (tokens @ w_k).mT / math.sqrt(d))  # (B, C, D) @ (B, D, N) -> (B, C, N)
    return torch.softmax(logits, dim=-1) @ (tokens @ w_v)  # (B, C, D)


class SVDAttention(nn.Module):
    """Target attention of C candidates over a long history through its SVD.

    See the module docstring for the modes, their cost and what each computes.
    Owns `w_q`, `w_k`, `w_v` (D, D), the same names and shapes as
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

    def forward(
        self, history: Tensor, lengths: Tensor, queries: Tensor, factors: SVDFactors | None = None
    ) -> Tensor:
        """history (B, L, D), lengths int64 (B,) in [0, L], queries (B, C, D) -> (B, C, D).

        `factors` (e.g. from a `FactorCache`) skip the factorisation; gradients
        then reach X only through whatever graph the factors carry.
        """
        check_inputs(history, lengths, queries, self.config.dim)
        if factors is not None and factors.S.shape[0] != history.shape[0]:
            raise ValueError(f"factors are of {factors.S.shape[0]} users but the history batch has {history.shape[0]} "
                             "(they would broadcast: every user would get the first user's factors)")
        lengths = lengths.to(history.device)
        x = _masked_history(history, lengths)  # (B, L, D)
        if self.config.mode == "truncated":
            return self._truncated(x, lengths, queries, factors)
        return self.attend_tokens(queries, self._compact_tokens(x, lengths, factors))

    def forward_jagged(self, values: Tensor, lengths: Tensor, queries: Tensor) -> Tensor:
        """Compact mode on jagged histories: values (sum lengths, D), the B
        histories' rows back to back, lengths int64 (B,), queries (B, C, D) ->
        (B, C, D), equal to `forward` on the zero-padded history.

        No padded (B, L, D) copy, no mask pass, and the backward returns the
        jagged gradient directly: each history's Gram and its gradient X W are
        one GEMM each (`svd_kernels.gram_matrix` with lengths). For long
        histories (the ranker's `JAGGED_MIN_MEAN_LENGTH`) these passes over
        B L D cost more than the factorisation itself; for short ones the
        per-history loop costs more than padding. Truncated mode needs the
        per-event logits and has no jagged form.
        """
        if self.config.mode != "compact":
            raise ValueError(f"forward_jagged is compact mode only; this op is {self.config.mode!r}")
        check_jagged_inputs(values, lengths, queries, self.config.dim)
        cfg = self.config
        m = compact_tokens(values, cfg.rank, cfg.taper, resolve_gram_dtype(cfg.gram_dtype),
                           jagged_segments(lengths))  # (B, D, D)
        return self.attend_tokens(queries, self.scale_tokens(m, lengths.to(m.device)).to(values.dtype))

    def _truncated(self, x: Tensor, lengths: Tensor, queries: Tensor, factors: SVDFactors | None) -> Tensor:
        b, length, d = x.shape
        r = self.config.rank
        if factors is None and r >= d:
            # V V^T = I: the truncation is the identity, so skip the factorisation
            xv, v_wv = x, self.w_v.expand(b, d, d)  # (B, L, D), (B, D, D)
            a = (queries @ self.w_q) @ self.w_k.mT  # (B, C, D)
        else:
            if factors is None:
                gram = resolve_gram_dtype(self.config.gram_dtype)
                _, v64 = factorize(x, r, subspace_only=True, gram_dtype=gram)
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

    def _compact_tokens(self, x: Tensor, lengths: Tensor, factors: SVDFactors | None) -> Tensor:
        """Tokens M (B, D, D) in x's dtype (normalised when configured)."""
        cfg = self.config
        if factors is None:
            m = compact_tokens(x, cfg.rank, cfg.taper, resolve_gram_dtype(cfg.gram_dtype))  # (B, D, D)
        else:
            if factors.S_all is None or factors.V_all is None:
                raise ValueError("compact needs the full spectrum in SVDFactors (S_all, V_all); use svd_factors")
            # factors come from the float64 Gram (svd_factors, FactorCache)
            m = tokens_from_spectrum(factors.S_all, factors.V_all, cfg.rank, cfg.taper,
                                     rank_floor(x.dtype, cfg.dim, "float64"))  # (B, D, D)
        return self.scale_tokens(m, lengths).to(x.dtype)

    def scale_tokens(self, m: Tensor, counts: Tensor) -> Tensor:
        """M (B, D, D) divided by sqrt(count) (B,) when normalize_tokens, else unchanged."""
        if not self.config.normalize_tokens:
            return m
        return m / counts.to(m.dtype).clamp_min(1).sqrt()[:, None, None]

    def attend_tokens(self, queries: Tensor, tokens: Tensor) -> Tensor:
        """Compact attention of queries (B, C, D) over given tokens (B, N, D) -> (B, C, D). O(C N D)."""
        return _compact_attention(queries, tokens.to(queries.dtype), self.w_q, self.w_k, self.w_v)


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
