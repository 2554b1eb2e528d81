"""Reference twins for `svd_attention`: plain, obvious, float64-capable code.

These are the slow ground truth the fast op is tested against; keep them boring.

Shape legend:
    B  users (requests) in the batch
    L  history length, padded; per-user valid length in `lengths` (B,)
    C  candidates per user
    D  embedding dim
    R  rank (interest tokens)

- `reference_target_attention`: exact masked softmax target attention,
  out = softmax(Q W_Q (X W_K)^T / sqrt(D)) X W_V, softmax over the L events.
  Cost O(L D^2 + C L D); it materialises the (B, C, L) logits.
- `fused_target_attention`: the same through torch's fused
  scaled_dot_product_attention (no (B, C, L) buffers): the bench's strong
  exact baseline.
- `reference_truncated_attention`: the same on X_R, the rank-R truncated SVD of
  the valid rows (via `torch.linalg.svd`): the twin of mode "truncated".
- `init_as_mean_pool_`: the ranker's initialisation of an attention encoder
  (W_Q = W_V = I, W_K = 0): target attention then starts as the plain mean of
  the valid history, and learns to depart from it.
- `reference_compact_attention`: per-user loop, `torch.linalg.svd`, tokens =
  rows of M = V diag(h(s)) V^T with the taper h(s_i) = s_i clip(1/2 + (s_i -
  m) / (2 taper s_1), 0, 1), m = (s_R + s_{R+1}) / 2, softmax over the D tokens: the twin of mode
  "compact". Its gradient is plain autograd through `torch.linalg.svd`, so it
  is only trustworthy on inputs with distinct singular values.

Padding (positions >= length) is replaced by zeros before any arithmetic, so
garbage there (even NaN) reaches neither outputs nor gradients. An empty
history (length 0) gives a zero output, never NaN.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def _valid_mask(lengths: Tensor, length: int) -> Tensor:
    return torch.arange(length, device=lengths.device)[None, :] < lengths[:, None]  # (B, L)


def _masked_history(history: Tensor, lengths: Tensor) -> Tensor:
    valid = _valid_mask(lengths, history.shape[1])  # (B, L)
    # where, not multiply: 0 * NaN is NaN, and where's backward sends zero to padding
    return torch.where(valid[..., None], history, torch.zeros((), dtype=history.dtype))  # (B, L, D)


def _attend(q: Tensor, k: Tensor, v: Tensor, valid: Tensor) -> Tensor:
    """softmax(q k^T / sqrt(D)) v over the valid keys.

    Invalid keys get the most negative finite logit, not -inf (which would give
    NaN for a row with no valid key). Where no key is valid, the callers' value
    vectors are all zero (zeroed padding; zero-energy tokens), so such a row
    averages zeros: its output is exactly 0.
    """
    d = q.shape[-1]
    logits = q @ k.mT / math.sqrt(d)  # (B, C, N)
    logits = logits.masked_fill(~valid[:, None, :], torch.finfo(logits.dtype).min)  # (B, C, N)
    return torch.softmax(logits, dim=-1) @ v  # (B, C, D)


def reference_target_attention(
    history: Tensor, lengths: Tensor, queries: Tensor, w_q: Tensor, w_k: Tensor, w_v: Tensor
) -> Tensor:
    """Exact masked target attention: (B, L, D), (B,), (B, C, D) -> (B, C, D)."""
    x = _masked_history(history, lengths)  # (B, L, D)
    valid = _valid_mask(lengths, history.shape[1])  # (B, L)
    return _attend(queries @ w_q, x @ w_k, x @ w_v, valid)


def fused_target_attention(
    history: Tensor, lengths: Tensor, queries: Tensor, w_q: Tensor, w_k: Tensor, w_v: Tensor
) -> Tensor:
    """The same exact attention as `reference_target_attention` through torch's
    fused `scaled_dot_product_attention` (on CPU a tiled flash kernel that never
    holds the (B, C, L) logits): the strong exact baseline of the attention
    bench. (B, L, D), (B,), (B, C, D) -> (B, C, D); an empty history gives 0.
    """
    x = _masked_history(history, lengths)  # (B, L, D)
    length = history.shape[1]
    mask = None
    if length and not bool((lengths >= length).all()):
        # an empty history attends to its zeroed padding (values 0): output 0, not NaN
        mask = (_valid_mask(lengths, length) | (lengths == 0)[:, None])[:, None, None, :]  # (B, 1, 1, L)
    out = torch.nn.functional.scaled_dot_product_attention(
        (queries @ w_q)[:, None], (x @ w_k)[:, None], (x @ w_v)[:, None], attn_mask=mask
    )  # (B, 1, C, D)
    return out[:, 0]


def rank_tolerance(dtype: torch.dtype, dim: int) -> float:
    """Singular values below this fraction of the largest count as zero.

    Mirrors `svd_kernels.rank_tolerance` (a test checks they agree): the Gram
    route resolves singular values only down to ~sqrt(eps64) of the largest,
    and float32 inputs carry their own rounding noise at ~D * eps32.
    """
    return min(max(1e-6, 4.0 * dim * torch.finfo(dtype).eps), 1e-3)


def _plain_svd(x: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """Top-`rank` SVD of one user's valid rows (n, D) with canonical signs, zero-padded to `rank`."""
    n, d = x.shape
    u, s, vh = torch.linalg.svd(x, full_matrices=False)  # (n, k), (k,), (k, D)
    v = vh.mT  # (D, k)
    k = min(rank, s.shape[0])
    u, s, v = u[:, :k], s[:k], v[:, :k]
    mass = x.sum(dim=0)  # (D,)
    proj = (v * mass[:, None]).sum(dim=0)  # (k,) = s * column sums of u
    fallback = v.gather(0, v.abs().argmax(dim=0, keepdim=True))[0]  # (k,)
    key = torch.where(proj.abs() > 1e-9 * mass.norm(), proj, fallback).detach()
    sign = torch.where(key >= 0, 1.0, -1.0).to(x.dtype)  # (k,)
    u, v = u * sign, v * sign
    if k < rank:  # fewer rows than the rank: the missing tokens have zero energy
        u = torch.cat([u, u.new_zeros(n, rank - k)], dim=1)
        s = torch.cat([s, s.new_zeros(rank - k)])
        v = torch.cat([v, v.new_zeros(d, rank - k)], dim=1)
    return u, s, v  # (n, R), (R,), (D, R)


def reference_truncated_attention(
    history: Tensor, lengths: Tensor, queries: Tensor, w_q: Tensor, w_k: Tensor, w_v: Tensor, rank: int
) -> Tensor:
    """Target attention on the rank-R truncated SVD of each history (twin of mode "truncated")."""
    x = _masked_history(history, lengths)  # (B, L, D)
    rows = []
    for b in range(x.shape[0]):
        n = int(lengths[b])
        xr = x[b].clone()  # (L, D)
        if n > 0:
            u, s, v = _plain_svd(x[b, :n], rank)
            xr = torch.cat([(u * s) @ v.mT, x[b, n:]], dim=0)  # (L, D)
        rows.append(xr)
    return reference_target_attention(torch.stack(rows), lengths, queries, w_q, w_k, w_v)


def reference_compact_attention(
    history: Tensor,
    lengths: Tensor,
    queries: Tensor,
    w_q: Tensor,
    w_k: Tensor,
    w_v: Tensor,
    rank: int,
    normalize_tokens: bool = False,
    taper: float = 0.05,
) -> Tensor:
    """Attention over the D rows of the tapered square root M of each Gram (twin of mode "compact").

    M = sum_i h_i v_i v_i^T, h_i = s_i clip(1/2 + (s_i - m) / (2 taper s_1), 0, 1),
    m = (s_R + s_{R+1}) / 2; h_i = s_i when R = D; `normalize_tokens` divides M by sqrt(length).
    """
    x = _masked_history(history, lengths)  # (B, L, D)
    d = x.shape[-1]
    ms = []
    for b in range(x.shape[0]):
        n = int(lengths[b])
        if n == 0:
            ms.append(x.new_zeros(d, d))
            continue
        _, s, vh = torch.linalg.svd(x[b, :n], full_matrices=True)  # (min(n, D),), (D, D)
        s = torch.cat([s, s.new_zeros(d - s.shape[0])])  # (D,) zero-padded
        if rank >= d:
            w = torch.ones_like(s)
        elif float(s[0].detach()) > 0:
            mid = (s[rank - 1] + s[rank]) / 2
            w = (0.5 + (s - mid) / (2 * taper * s[0])).clamp(0.0, 1.0)  # (D,)
        else:
            w = torch.zeros_like(s)
        m = (vh.mT * (s * w)) @ vh  # (D, D)
        ms.append(m / math.sqrt(n) if normalize_tokens else m)
    m = torch.stack(ms)  # (B, D, D)
    return _attend(queries @ w_q, m @ w_k, m @ w_v, torch.ones(m.shape[:2], dtype=torch.bool, device=m.device))


@torch.no_grad()
def init_as_mean_pool_(attention: nn.Module) -> nn.Module:
    """Set W_Q = I, W_K = 0, W_V = I in place (any module with D x D `w_q`, `w_k`, `w_v`); returns it.

    Every logit is then 0, so target attention is exactly the mean of the
    valid history: the summary a mean-pooling ranker starts from, in the
    candidate's own coordinates (so the ranker's candidate * summary is
    candidate * mean). The bilinear form W_Q W_K^T starts at 0 and is learned:
    dL/dW_K = (Q W_Q)^T (...) is not 0 because W_Q = I (zeroing both would be
    a saddle with zero gradient on each).

    Why not xavier on all three (the modules' own default): a random 16 x 16
    W_V has singular values from ~2 down to ~0.02, so the summary starts as a
    rotated, nearly rank-deficient projection of the mean, and candidate *
    summary no longer contains the candidate-history dot product; on the
    long-history A/B (experiments/ab_long_history.yaml) such an arm learned
    no more from 10k events than from the last 256 (README). Deterministic:
    it draws nothing from the ranker's generator.
    """
    d = attention.w_v.shape[0]
    eye = torch.eye(d, dtype=attention.w_v.dtype, device=attention.w_v.device)
    attention.w_q.copy_(eye)
    attention.w_k.zero_()
    attention.w_v.copy_(eye)
    return attention


class TargetAttention(nn.Module):
    """Exact target attention of C candidate queries over a padded history.

    Owns `w_q`, `w_k`, `w_v` (D, D), the same names and shapes as
    `SVDAttention`, so a state_dict copies between the two. Computed by
    `fused_target_attention` (torch's fused kernel: on CPU about 2x faster
    than the plain twin in training at B=16, L=10k, C=50, D=16, and without
    its (B, C, L) buffers), equal to `reference_target_attention` up to
    rounding (tested, gradients included).

    Example:
        >>> att = TargetAttention(8)
        >>> out = att(torch.randn(2, 5, 8), torch.tensor([5, 3]), torch.randn(2, 4, 8))
        >>> out.shape
        torch.Size([2, 4, 8])
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        self.dim = dim
        self.w_q = nn.Parameter(torch.empty(dim, dim))
        self.w_k = nn.Parameter(torch.empty(dim, dim))
        self.w_v = nn.Parameter(torch.empty(dim, dim))
        for w in (self.w_q, self.w_k, self.w_v):
            nn.init.xavier_uniform_(w)

    def forward(self, history: Tensor, lengths: Tensor, queries: Tensor) -> Tensor:
        return fused_target_attention(history, lengths, queries, self.w_q, self.w_k, self.w_v)
