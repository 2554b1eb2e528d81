"""Retrieval metrics and teacher-student diagnostics: pure functions of
arrays, higher is better for all of them.

Shape legend:
    I  items, N rows (queries or items), A anchors, K results per query
"""

from __future__ import annotations

import numpy as np

from features.core.numeric import l2_normalise


def hits_at_k(ranked: np.ndarray, targets: np.ndarray, k: int) -> np.ndarray:
    """(N,) bool: target among the first k ids of each row of `ranked` (N, K)."""
    return (np.asarray(ranked)[:, :k] == np.asarray(targets)[:, None]).any(1)


def recall_at_k(ranked: np.ndarray, targets: np.ndarray, k: int) -> float:
    """Share of rows whose single target is in the top k (one relevant item per
    query, so recall equals hit rate). Higher is better; nan for no rows."""
    if len(targets) == 0:
        return float("nan")
    return float(hits_at_k(ranked, targets, k).mean())


def nmi(labels_a: np.ndarray, labels_b: np.ndarray) -> float:
    """Normalised mutual information (arithmetic mean normalisation) of two
    clusterings of the same points; 1 = same partition. Higher is better."""
    from sklearn.metrics import normalized_mutual_info_score

    return float(normalized_mutual_info_score(labels_a, labels_b))


def kmeans_labels(x: np.ndarray, n_clusters: int, seed: int) -> np.ndarray:
    """k-means cluster of each row of L2-normalised `x` (spherical-ish k-means)."""
    from sklearn.cluster import KMeans

    xn = l2_normalise(x)
    k = max(1, min(n_clusters, len(xn)))
    return KMeans(n_clusters=k, n_init=3, random_state=seed).fit_predict(xn)


def topk_overlap(nbrs_a: np.ndarray, nbrs_b: np.ndarray) -> float:
    """Mean over rows of |top-k(a) & top-k(b)| / k for neighbour id lists (N, k).
    Chance level for a catalog of n candidates is k / n. Higher is better."""
    a, b = np.asarray(nbrs_a), np.asarray(nbrs_b)
    if a.size == 0:
        return float("nan")
    k = a.shape[1]
    return float(np.mean([len(np.intersect1d(x, y)) / k for x, y in zip(a, b)]))


def kendall_tau(x: np.ndarray, y: np.ndarray) -> float:
    """Kendall tau-b between two score vectors of the same candidates:
    (concordant - discordant) / sqrt((n0 - ties_x) (n0 - ties_y)), n0 = n(n-1)/2.
    1 = same order, -1 = reversed; nan when either side is constant."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    i, j = np.triu_indices(len(x), 1)
    dx, dy = np.sign(x[i] - x[j]), np.sign(y[i] - y[j])
    n0 = len(i)
    denom = np.sqrt(float(n0 - (dx == 0).sum()) * float(n0 - (dy == 0).sum()))
    return float((dx * dy).sum() / denom) if denom > 0 else float("nan")


def neighbours(emb: np.ndarray, anchors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Cosine top-k neighbours of each anchor row among all rows of `emb`,
    the anchor itself excluded: (ids (A, k), cosine matrix (A, N))."""
    e = l2_normalise(emb)
    sim = e[anchors] @ e.T  # (A, N)
    sim[np.arange(len(anchors)), anchors] = -np.inf
    k = min(k, len(e) - 1)
    part = np.argpartition(-sim, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(sim, part, 1), axis=1, kind="stable")
    return np.take_along_axis(part, order, 1), sim


def neighbour_agreement(
    emb: np.ndarray, ref: np.ndarray, anchors: np.ndarray, k: int = 10, tau_k: int = 50
) -> tuple[float, float]:
    """How well `emb` reproduces the neighbourhoods of `ref` (same rows):
    (mean top-k overlap, mean Kendall tau-b of the two cosine scores over the
    reference's top-`tau_k` neighbours of each anchor)."""
    nb_ref, sim_ref = neighbours(ref, anchors, max(k, tau_k))
    nb_emb, sim_emb = neighbours(emb, anchors, k)
    overlap = topk_overlap(nb_emb, nb_ref[:, :k])
    taus = [kendall_tau(sim_ref[r, c], sim_emb[r, c]) for r, c in enumerate(nb_ref[:, :tau_k])]
    return overlap, float(np.nanmean(taus)) if len(taus) else float("nan")


def bijective_accuracy(projected: np.ndarray, teacher: np.ndarray) -> float:
    """Round-trip (bijective) retrieval accuracy between two aligned spaces.

    Rows i of `projected` (the student's P_k z_i, in teacher k's space) and
    `teacher` (e_k,i) describe the same N items. Item i counts as a hit when
    BOTH directions retrieve it by cosine among the N items: the nearest
    teacher vector to P_k z_i is e_k,i, and the nearest projected student
    vector to e_k,i is P_k z_i. Accuracy is the share of hits (chance ~1/N^2
    for independent spaces, at most 1). Higher is better.
    """
    p, t = l2_normalise(projected), l2_normalise(teacher)
    if len(p) == 0:
        return float("nan")
    sim = p @ t.T  # (N, N): student i vs teacher j
    idx = np.arange(len(p))
    return float(((sim.argmax(1) == idx) & (sim.argmax(0) == idx)).mean())



def diagnostics(
    emb: np.ndarray,
    ref: np.ndarray,
    items: np.ndarray,
    name: str,
    ref_name: str,
    *,
    k: int = 10,
    n_clusters: int = 20,
    max_anchors: int = 500,
    seed: int = 0,
    projected: np.ndarray | None = None,
    ref_labels: np.ndarray | None = None,
) -> dict[str, float]:
    """Paper diagnostics of `emb` against a teacher's `ref`, over the rows `items`
    (warm items the teacher knows):

    - nmi_{name}_vs_{ref}: NMI of k-means clusterings (n_clusters each);
    - topk_overlap_...: mean top-k neighbour overlap (chance k / len(items));
    - kendall_tau_...: mean tau-b of the neighbour scores over the teacher's
      top-50 neighbours of each anchor (up to `max_anchors`, seeded sample);
    - bijective_acc_...: `bijective_accuracy(projected, ref)` when the
      student's projection into the teacher's space is given (up to 2,000
      seeded items, candidates restricted to them).

    `ref_labels`: the teacher's k-means labels of `items`, when already known
    (they do not depend on the model compared).
    """
    rng = np.random.default_rng(seed)
    e, r = emb[items], ref[items]
    if ref_labels is None:
        ref_labels = kmeans_labels(r, n_clusters, seed)
    out = {f"nmi_{name}_vs_{ref_name}": nmi(kmeans_labels(e, n_clusters, seed), ref_labels)}
    anchors = rng.choice(len(items), min(max_anchors, len(items)), replace=False)
    overlap, tau = neighbour_agreement(e, r, anchors, k=k, tau_k=min(50, len(items) - 1))
    out[f"topk_overlap_{name}_vs_{ref_name}"] = overlap
    out[f"kendall_tau_{name}_vs_{ref_name}"] = tau
    if projected is not None:
        sub = rng.choice(len(items), min(2000, len(items)), replace=False)
        out[f"bijective_acc_{name}_vs_{ref_name}"] = bijective_accuracy(projected[items][sub], r[sub])
    return out



__all__ = [
    "hits_at_k",
    "recall_at_k",
    "nmi",
    "kmeans_labels",
    "topk_overlap",
    "kendall_tau",
    "neighbours",
    "neighbour_agreement",
    "bijective_accuracy",
    "diagnostics",
]
