"""Distillation losses (after SAIL-Embedding's collaboration-aware enhancement).

- L_s2i (sequence-to-item): InfoNCE between the mean of a user's recent
  positives' student embeddings (the query) and the student embedding of the
  next positive, with in-batch negatives and a learnable temperature.
- L_id2i (ID-to-item): sum over frozen ID teachers k of mean(1 - cos(P_k z,
  stopgrad(e_k))): the student, through one projection head per teacher,
  regresses the direction of the teacher's item vector.
- L_i2i (item-to-item, auxiliary): InfoNCE on item pairs that the same user
  liked close in time (pairs oriented at random).
- L_geo (relational regulariser, off by default): row-wise
  KL(softmax(C C^T / t) || softmax(Z Z^T / t)) over a batch's items, diagonal
  masked, where C is the frozen raw content embedding and Z the student's
  vectors (both L2-normalised): the student keeps the content's in-batch
  neighbourhood structure for the warm items it trains on, so that warm and
  cold items stay on one geometry (relational KD, Park et al., CVPR 2019).
- Matryoshka: each loss is averaged over prefixes z[:, :d] (each prefix
  normalised on its own), so the first 16 or 32 dims are a usable embedding.

Every function is pure (tensors in, scalar out); the only state is the
learnable temperature, a module.

Shape legend:
    B  batch (queries, pairs or items)
    L  history length (query items), padded; `mask` marks real entries
    D  student dim (a prefix d <= D under matryoshka)
    K  a teacher's dim
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class Temperature(nn.Module):
    """tau = exp(log_tau), learnable, kept in [min_tau, max_tau] so the logits'
    scale cannot run away (1/tau is the softmax sharpness)."""

    def __init__(self, init: float = 0.07, min_tau: float = 0.01, max_tau: float = 1.0) -> None:
        super().__init__()
        if not min_tau <= init <= max_tau:
            raise ValueError(f"initial temperature {init} outside [{min_tau}, {max_tau}]")
        self.log_tau = nn.Parameter(torch.tensor(math.log(init)))
        self.min_tau, self.max_tau = min_tau, max_tau

    def forward(self) -> torch.Tensor:
        return self.log_tau.exp().clamp(self.min_tau, self.max_tau)


def info_nce(
    query: torch.Tensor,
    target: torch.Tensor,
    temperature: torch.Tensor | float,
    target_ids: torch.Tensor | None = None,
    log_q: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean over rows of -log softmax_j(cos(q_i, t_j) / tau - log_q_j)[i]
    (in-batch negatives).

    query, target: (B, D). When `target_ids` (B,) is given, another row whose
    target is the same item is not a negative (it is masked out), so a popular
    item appearing twice in a batch is not pushed away from its own queries.
    `log_q` (B,): log of each target's sampling probability. In-batch
    negatives are drawn in proportion to popularity, so without the
    correction the scores learn popularity *out* (Yi et al., RecSys 2019,
    "sampling-bias-corrected" softmax); with it they estimate the full softmax.
    """
    return _info_nce(query, target, temperature, negative_bias(len(query), target_ids, log_q))


def negative_bias(b: int, target_ids: torch.Tensor | None = None, log_q: torch.Tensor | None = None) -> torch.Tensor | None:
    """Additive (B, B) logit bias of `info_nce`: -inf where another row has the
    same target, -log_q[j] in column j; None when neither is given. Built once
    per batch and shared by the matryoshka prefixes."""
    if target_ids is None and log_q is None:
        return None
    bias = torch.zeros(b, b) if log_q is None else (-log_q)[None, :].expand(b, b).clone()  # (B, B)
    if target_ids is not None:
        same = target_ids[:, None] == target_ids[None, :]  # (B, B)
        same.fill_diagonal_(False)
        bias = bias.masked_fill(same, float("-inf"))
    return bias


def _info_nce(query: torch.Tensor, target: torch.Tensor, temperature: torch.Tensor | float, bias: torch.Tensor | None) -> torch.Tensor:
    q = F.normalize(query, dim=-1)  # (B, D)
    t = F.normalize(target, dim=-1)  # (B, D)
    logits = q @ t.T / temperature  # (B, B)
    if bias is not None:
        logits = logits + bias
    return F.cross_entropy(logits, torch.arange(len(q), device=q.device))


def masked_mean_query(hist: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of the L2-normalised history embeddings, (B, L, D) x (B, L) -> (B, D).

    Rows without any real entry give a zero vector (callers drop them)."""
    h = F.normalize(hist, dim=-1) * mask[..., None]  # (B, L, D)
    return h.sum(1) / mask.sum(1, keepdim=True).clamp_min(1)  # (B, D)


def s2i_loss(
    hist_z: torch.Tensor,
    hist_mask: torch.Tensor,
    target_z: torch.Tensor,
    temperature: torch.Tensor | float,
    target_ids: torch.Tensor | None = None,
    dims: Sequence[int] = (),
    log_q: torch.Tensor | None = None,
) -> torch.Tensor:
    """L_s2i: InfoNCE(mean of the history's embeddings, next item's embedding).

    hist_z (B, L, D), hist_mask (B, L) float/bool, target_z (B, D). `dims` are
    matryoshka prefixes; the loss is averaged over them and the full D.
    `log_q` (B,): see `info_nce`."""
    mask = hist_mask.to(hist_z.dtype)
    bias = negative_bias(len(target_z), target_ids, log_q)
    losses = []
    for d in _prefixes(dims, target_z.shape[-1]):
        query = masked_mean_query(hist_z[..., :d], mask)  # (B, d)
        losses.append(_info_nce(query, target_z[:, :d], temperature, bias))
    return torch.stack(losses).mean()


def i2i_loss(
    a_z: torch.Tensor,
    b_z: torch.Tensor,
    temperature: torch.Tensor | float,
    b_ids: torch.Tensor | None = None,
    dims: Sequence[int] = (),
    b_log_q: torch.Tensor | None = None,
) -> torch.Tensor:
    """L_i2i: InfoNCE on co-interacted pairs (a_i, b_i), (B, D) each: a_i must
    pick b_i among the batch's b's, averaged over the matryoshka prefixes.
    One direction per pair: callers orient pairs at random, which gives the
    symmetric loss in expectation at half the cost."""
    bias = negative_bias(len(a_z), b_ids, b_log_q)
    losses = []
    for d in _prefixes(dims, a_z.shape[-1]):
        losses.append(_info_nce(a_z[:, :d], b_z[:, :d], temperature, bias))
    return torch.stack(losses).mean()


def cosine_distill(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """mean_i (1 - cos(pred_i, stopgrad(target_i))) over rows where mask is set;
    pred, target (B, K), mask (B,). Zero (with a graph) when no row is set."""
    cos = F.cosine_similarity(pred, target.detach(), dim=-1)  # (B,)
    if mask is None:
        return (1 - cos).mean()
    m = mask.to(cos.dtype)
    return ((1 - cos) * m).sum() / m.sum().clamp_min(1)


def id2i_loss(
    projections: Sequence[torch.Tensor],
    targets: Sequence[torch.Tensor],
    masks: Sequence[torch.Tensor | None],
) -> torch.Tensor:
    """L_id2i: sum over teachers k of cosine_distill(P_k z, e_k, known_k).

    One entry per teacher (matryoshka prefixes enter as extra entries whose
    loss the caller scales by 1 / #prefixes)."""
    if not projections:
        raise ValueError("id2i_loss needs at least one teacher")
    return torch.stack([cosine_distill(p, t, m) for p, t, m in zip(projections, targets, masks)]).sum()


def geo_loss(z: torch.Tensor, content: torch.Tensor, temperature: float, content_temperature: float | None = None) -> torch.Tensor:
    """L_geo: mean over rows i of KL(p_i || q_i), p_i = softmax_{j != i}(cos(c_i, c_j) / t_c),
    q_i = softmax_{j != i}(cos(z_i, z_j) / t), the target p detached.

    z (U, D) student vectors, content (U, R) the frozen content vectors of the
    same items. t_c defaults to t. Zero when the two geometries give the same
    neighbour distributions (equal Gram matrices); zero (with a graph) with
    fewer than 3 items, where each row has at most one neighbour."""
    if len(z) < 3:
        return z.sum() * 0.0
    t_c = temperature if content_temperature is None else content_temperature
    zn = F.normalize(z, dim=-1)  # (U, D)
    cn = F.normalize(content.detach().to(z.dtype), dim=-1)  # (U, R)
    diag = torch.eye(len(z), dtype=torch.bool, device=z.device)  # (U, U)
    log_q = F.log_softmax((zn @ zn.T / temperature).masked_fill(diag, float("-inf")), dim=-1)  # (U, U)
    log_p = F.log_softmax((cn @ cn.T / t_c).masked_fill(diag, float("-inf")), dim=-1)  # (U, U)
    # the diagonal holds -inf in both: 0 * (-inf - -inf) is nan, so drop it
    kl = (log_p.exp() * (log_p - log_q)).masked_fill(diag, 0.0)  # (U, U)
    return kl.sum(1).mean()


def _prefixes(dims: Sequence[int], full: int) -> list[int]:
    """Sorted distinct prefix sizes below `full`, plus `full` itself."""
    return sorted({d for d in dims if 0 < d < full} | {full})


__all__ = ["Temperature", "info_nce", "negative_bias", "masked_mean_query", "s2i_loss", "i2i_loss", "cosine_distill", "id2i_loss", "geo_loss"]
