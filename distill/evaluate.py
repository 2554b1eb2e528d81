"""Cold-start protocol, retrieval metrics and teacher-student diagnostics.

Protocol (`prepare_cold_start`):
- Held-out items: a share (`holdout_frac`, default 0.2) of the items that have
  train events, drawn with `np.random.default_rng(seed)`. ALL their
  interactions are removed from teacher and student training: teachers and
  student learn only from train-split positives of the other items.
- warm item = has train events and is not held out; cold item = held out or
  without any train event. Teachers "know" the items with >= 1 train positive
  that are not held out (`known`); only those can be retrieved by a teacher.
- The valid split is for choices (early stopping, model selection); the
  test split is reported. Nothing is ever chosen on test. The student's
  early stopping averages valid Recall@k over warm and cold targets, so the
  held-out items' valid-period interactions inform which epoch is kept
  (never a gradient); their test-period interactions are only reported.

Retrieval task (`Impressions`), for each positive impression of a split:
- query history: the user's strictly earlier positives (features columns
  `pos_hist_end`/`pos_hist_len` into `sequences.pos_item_ids`), the most recent
  `history_len` kept, right-aligned. It includes valid/test-period events and
  held-out items: they are the user's real past; the student embeds any item
  from content, a teacher drops the items it does not know.
- candidates: ALL items of items.parquet (a teacher: the items it knows).
- excluded from the ranking: every item of the user's strictly earlier
  history, positive or not (`sequences.item_ids[:hist_end]`): re-recommending
  an item the user already rated is not what cold-start retrieval measures.
  Impressions whose target is in that history (repeat consumption) are
  dropped, as are impressions without any earlier positive (no query). Both
  counts are reported (`n_{split}_skipped_*`).
- hit: target in the top k; Recall@k is the share of hits, reported
  separately for warm and cold targets.

Queries: for embedding models (student, raw content, ID teacher), the mean of
the last `query_len` history items' L2-normalised embeddings (an ID teacher
uses its last `query_len` known items); for the sequence teacher, its own
history encoder. A model without a query for an impression (an ID teacher
when no history item is known) scores a miss there.

Shape legend:
    I  items, N impressions, H history kept per impression
    D  embedding dim, K results per query
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import polars as pl

from distill.index import IndexConfig, build_index, search_excluding
from features import schemas as S
from features.core.errors import DataError

GROUPS = ("warm", "cold", "all")


# --- metrics (pure; higher is better for all of them) --------------------------


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

    xn = _l2(x)
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
    e = _l2(emb)
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
    p, t = _l2(projected), _l2(teacher)
    if len(p) == 0:
        return float("nan")
    sim = p @ t.T  # (N, N): student i vs teacher j
    idx = np.arange(len(p))
    return float(((sim.argmax(1) == idx) & (sim.argmax(0) == idx)).mean())


def _l2(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


# --- protocol data --------------------------------------------------------------


@dataclass
class Impressions:
    """Positive impressions of one split, ready for retrieval."""

    users: np.ndarray  # (N,) dense user index
    targets: np.ndarray  # (N,) dense item index
    hist: np.ndarray  # (N, H) right-aligned history of dense item indices, -1 = padding
    cold: np.ndarray  # (N,) bool: target is a cold item
    exclude_offsets: np.ndarray | None = None  # (N + 1,) into exclude_values
    exclude_values: np.ndarray | None = None  # items excluded from each ranking

    def __len__(self) -> int:
        return len(self.targets)

    def excluded(self) -> list[np.ndarray]:
        if self.exclude_offsets is None:
            return [np.zeros(0, np.int64)] * len(self)
        o, v = self.exclude_offsets, self.exclude_values
        return [v[o[i] : o[i + 1]] for i in range(len(self))]


@dataclass
class ColdStartData:
    """Everything the teachers, the student and the evaluation need, in dense
    indices: items in items.parquet order, users in sorted user_id order."""

    item_ids: np.ndarray  # (I,)
    user_ids: np.ndarray  # (U,)
    heldout: np.ndarray  # (I,) bool
    warm: np.ndarray  # (I,) bool: has train events and not held out
    known: np.ndarray  # (I,) bool: warm with >= 1 train positive (teachers learn these)
    train_users: np.ndarray  # (P,) train positives minus held-out items ...
    train_items: np.ndarray  # (P,) ... in time order
    train_sequences: list[np.ndarray]  # per user with train positives, item indices in time order
    train: Impressions  # train positives with a (held-out-free) earlier positive history
    valid: Impressions
    test: Impressions
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    @property
    def n_users(self) -> int:
        return len(self.user_ids)


def _dense(ids: np.ndarray, universe: np.ndarray, what: str, file: str) -> np.ndarray:
    pos = np.searchsorted(universe, ids)
    pos = np.clip(pos, 0, max(len(universe) - 1, 0))
    bad = len(universe) == 0 or (universe[pos] != ids).any()
    if bad:
        missing = np.setdiff1d(ids, universe)[:5].tolist()
        raise DataError(f"{what} ids not found in the catalog: {missing}", file=file, column=what)
    return pos


def _flatten(col: pl.Series) -> tuple[np.ndarray, np.ndarray]:
    """List column -> (values, offsets (n + 1,))."""
    lengths = col.list.len().fill_null(0).to_numpy().astype(np.int64)
    values = col.explode().drop_nulls().to_numpy().astype(np.int64)
    if len(values) != lengths.sum():
        raise DataError("list column has null entries", file=S.FILES["sequences"], column=col.name)
    return values, np.concatenate([[0], np.cumsum(lengths)])


def _gather_hist(values: np.ndarray, start: np.ndarray, end: np.ndarray, h: int) -> np.ndarray:
    """(N, h) right-aligned windows values[max(start, end - h) : end], -1 padded."""
    cols = np.arange(h)
    idx = end[:, None] - h + cols[None, :]  # (N, h)
    valid = idx >= start[:, None]
    safe = np.clip(idx, 0, max(len(values) - 1, 0))
    return np.where(valid, values[safe] if len(values) else -1, -1)


def _segment_any(flags: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    seg = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
    return np.bincount(seg, weights=flags.astype(np.float64), minlength=len(offsets) - 1) > 0


def prepare_cold_start(
    interactions: pl.DataFrame,
    sequences: pl.DataFrame,
    items: pl.DataFrame,
    *,
    holdout_frac: float = 0.2,
    seed: int = 0,
    history_len: int = 50,
) -> ColdStartData:
    """Hold out items and build train pairs/sequences and valid/test impressions."""
    items = items.sort(S.ITEM_ID)
    item_ids = items[S.ITEM_ID].to_numpy().astype(np.int64)
    seqs = sequences.sort(S.USER_ID)
    user_ids = seqs[S.USER_ID].to_numpy().astype(np.int64)
    n_items = len(item_ids)

    has_train = items[S.N_TRAIN].fill_null(0).to_numpy() > 0
    eligible = np.flatnonzero(has_train)
    rng = np.random.default_rng(seed)
    n_hold = int(round(holdout_frac * len(eligible)))
    heldout = np.zeros(n_items, dtype=bool)
    heldout[rng.choice(eligible, n_hold, replace=False)] = True
    warm = has_train & ~heldout

    pos_vals, pos_off = _flatten(seqs[S.POS_ITEM_IDS])
    all_vals, all_off = _flatten(seqs[S.ITEM_IDS])
    pos_vals = _dense(pos_vals, item_ids, S.ITEM_ID, S.FILES["sequences"])
    all_vals = _dense(all_vals, item_ids, S.ITEM_ID, S.FILES["sequences"])

    cols = [S.USER_ID, S.ITEM_ID, S.SPLIT, S.POS_HIST_END, S.POS_HIST_LEN, S.HIST_END]
    pos = interactions.filter(pl.col(S.LABEL) == 1).select(cols)
    users_all = _dense(pos[S.USER_ID].to_numpy().astype(np.int64), user_ids, S.USER_ID, S.FILES["interactions"])
    items_all = _dense(pos[S.ITEM_ID].to_numpy().astype(np.int64), item_ids, S.ITEM_ID, S.FILES["interactions"])
    split = pos[S.SPLIT].to_numpy()
    pe = pos[S.POS_HIST_END].to_numpy().astype(np.int64)
    plen = pos[S.POS_HIST_LEN].to_numpy().astype(np.int64)
    he = pos[S.HIST_END].to_numpy().astype(np.int64)

    # --- train: positives of non-held-out items; histories without held-out items
    tr = (split == "train") & ~heldout[items_all]
    known = np.zeros(n_items, dtype=bool)
    known[items_all[tr]] = True
    tr_idx = np.flatnonzero(tr)
    by_user = tr_idx[np.argsort(users_all[tr_idx], kind="stable")]  # time order within a user
    tu, ti = users_all[by_user], items_all[by_user]
    bounds = np.flatnonzero(np.diff(tu)) + 1
    train_sequences = [s for s in np.split(ti, bounds) if len(s)]
    keep = ~heldout[pos_vals]
    ck = np.concatenate([[0], np.cumsum(keep)])  # exclusive prefix count of kept positives
    f_vals, f_off = pos_vals[keep], ck[pos_off]
    u_tr = users_all[tr_idx]
    f_end_abs = ck[pos_off[u_tr] + pe[tr_idx]]  # position in f_vals after the history
    has_hist = f_end_abs > f_off[u_tr]
    t_sel = tr_idx[has_hist]
    train = Impressions(
        users=users_all[t_sel],
        targets=items_all[t_sel],
        hist=_gather_hist(f_vals, f_off[users_all[t_sel]], f_end_abs[has_hist], history_len),
        cold=np.zeros(len(t_sel), dtype=bool),
    )

    counts: dict[str, int] = {
        "n_items": n_items,
        "n_items_heldout": int(heldout.sum()),
        "n_items_warm": int(warm.sum()),
        "n_items_cold": int((~warm).sum()),
        "n_items_known": int(known.sum()),
        "n_train_pairs": len(tu),
        "n_train_examples": len(t_sel),
    }
    splits = {}
    for name in ("valid", "test"):
        sel = np.flatnonzero(split == name)
        u, t = users_all[sel], items_all[sel]
        hist = _gather_hist(pos_vals, pos_off[u] + pe[sel] - plen[sel], pos_off[u] + pe[sel], history_len)
        ex_len = he[sel]
        ex_off = np.concatenate([[0], np.cumsum(ex_len)])
        ex_start = np.repeat(all_off[u] - ex_off[:-1], ex_len)
        ex_vals = all_vals[ex_start + np.arange(ex_off[-1])] if ex_off[-1] else np.zeros(0, np.int64)
        repeat = _segment_any(ex_vals == np.repeat(t, ex_len), ex_off)
        no_hist = pe[sel] == 0
        ok = ~repeat & ~no_hist
        counts[f"n_{name}_skipped_no_history"] = int(no_hist.sum())
        counts[f"n_{name}_skipped_repeat"] = int((repeat & ~no_hist).sum())
        # re-pack the exclusion lists of the kept impressions
        imps = Impressions(
            users=u[ok],
            targets=t[ok],
            hist=hist[ok],
            cold=~warm[t[ok]],
            exclude_offsets=np.concatenate([[0], np.cumsum(ex_len[ok])]),
            exclude_values=ex_vals[np.repeat(ok, ex_len)],
        )
        counts[f"n_{name}_warm"] = int((~imps.cold).sum())
        counts[f"n_{name}_cold"] = int(imps.cold.sum())
        splits[name] = imps
    if len(tu) == 0:
        raise DataError("no train positives left after holding out items", file=S.FILES["interactions"], column=S.LABEL)
    return ColdStartData(
        item_ids=item_ids,
        user_ids=user_ids,
        heldout=heldout,
        warm=warm,
        known=known,
        train_users=users_all[by_user],
        train_items=items_all[by_user],
        train_sequences=train_sequences,
        train=train,
        valid=splits["valid"],
        test=splits["test"],
        counts=counts,
    )


# --- retrieval --------------------------------------------------------------------


def last_items(hist: np.ndarray, q: int, usable: np.ndarray | None = None) -> np.ndarray:
    """The last q entries of right-aligned histories (N, H) -> (N, q), keeping only
    items flagged in `usable` (I,) when given (order preserved, -1 padded)."""
    h = np.asarray(hist)
    if usable is not None:
        keep = (h >= 0) & usable[np.maximum(h, 0)]
        order = np.argsort(keep, axis=1, kind="stable")  # False first: kept entries move right
        h = np.where(np.take_along_axis(keep, order, 1), np.take_along_axis(h, order, 1), -1)
    h = h[:, -q:]
    if h.shape[1] < q:
        h = np.pad(h, ((0, 0), (q - h.shape[1], 0)), constant_values=-1)
    return h


def mean_queries(item_emb: np.ndarray, hist: np.ndarray, q: int, usable: np.ndarray | None = None, normalize: bool = True) -> np.ndarray:
    """Mean of the last q usable history items' embeddings (L2-normalised first
    when `normalize`), (N, D); rows without a usable item are zero."""
    e = _l2(item_emb) if normalize else np.asarray(item_emb, dtype=np.float32)
    h = last_items(hist, q, usable)  # (N, q)
    m = (h >= 0).astype(np.float32)  # (N, q)
    x = e[np.maximum(h, 0)] * m[..., None]  # (N, q, D)
    out = x.sum(1) / np.maximum(m.sum(1, keepdims=True), 1)
    return _l2(out) if normalize else out.astype(np.float32)


def rank_items(
    item_emb: np.ndarray,
    queries: np.ndarray,
    imps: Impressions,
    k: int,
    *,
    candidates: np.ndarray | None = None,
    index_cfg: IndexConfig = IndexConfig(),
) -> np.ndarray:
    """Top-k dense item ids (N, k) per impression, -1 padded, the user's history
    excluded; only `candidates` (I,) bool items are indexed when given. A zero
    query (no usable history) returns an empty row (a miss)."""
    n_items = len(item_emb)
    cand = np.arange(n_items) if candidates is None else np.flatnonzero(candidates)
    out = np.full((len(imps), k), -1, dtype=np.int64)
    has_q = np.abs(queries).sum(1) > 0
    if len(cand) == 0 or not has_q.any():
        return out
    local_of = np.full(n_items, -1, dtype=np.int64)
    local_of[cand] = np.arange(len(cand))
    index = build_index(np.ascontiguousarray(item_emb[cand], dtype=np.float32), index_cfg)
    rows = np.flatnonzero(has_q)
    excl = imps.excluded()
    excl_local = [e[e >= 0] for e in (local_of[excl[r]] for r in rows)]
    ids = search_excluding(index, queries[rows], k, excl_local)  # (n, k) local ids
    out[rows] = np.where(ids >= 0, cand[np.maximum(ids, 0)], -1)
    return out


def recall_report(ranked: np.ndarray, imps: Impressions, ks: Sequence[int], name: str, groups: Sequence[str] = GROUPS) -> dict[str, float]:
    """{f"recall@{k}_{group}_{name}": value} for warm, cold and all targets."""
    out = {}
    masks = {"warm": ~imps.cold, "cold": imps.cold, "all": np.ones(len(imps), dtype=bool)}
    for g in groups:
        m = masks[g]
        for k in ks:
            out[f"recall@{k}_{g}_{name}"] = recall_at_k(ranked[m], imps.targets[m], k)
    return out


@dataclass
class Retriever:
    """One model under evaluation: item vectors, how it builds queries, and
    which items it can retrieve (None: all)."""

    item_emb: np.ndarray  # (I, D)
    query_fn: Callable[[Impressions], np.ndarray]  # -> (N, D)
    candidates: np.ndarray | None = None  # (I,) bool
    groups: tuple[str, ...] = GROUPS


def embedding_retriever(item_emb: np.ndarray, q: int, usable: np.ndarray | None = None, normalize: bool = True) -> Retriever:
    """Mean-of-last-q-items retrieval over `item_emb` (cosine when `normalize`)."""
    e = _l2(item_emb) if normalize else np.asarray(item_emb, dtype=np.float32)
    groups = GROUPS if usable is None else ("warm",)
    return Retriever(e, lambda imps: mean_queries(e, imps.hist, q, usable, normalize), usable, groups)


def evaluate_retrievers(
    retrievers: Mapping[str, Retriever], imps: Impressions, ks: Sequence[int], index_cfg: IndexConfig = IndexConfig()
) -> dict[str, float]:
    """Recall@k per model and target group on one split's impressions."""
    out: dict[str, float] = {}
    kmax = max(ks)
    for name, r in retrievers.items():
        ranked = rank_items(r.item_emb, r.query_fn(imps), imps, kmax, candidates=r.candidates, index_cfg=index_cfg)
        out.update(recall_report(ranked, imps, ks, name, r.groups))
    return out


def selection_score(item_emb: np.ndarray, imps: Impressions, q: int, k: int, usable: np.ndarray | None = None) -> float:
    """The valid-split choice metric: Recall@k averaged over the warm and cold
    groups (warm only when the model can only retrieve `usable` items, or when
    a group is empty), exact search."""
    r = embedding_retriever(item_emb, q, usable)
    m = evaluate_retrievers({"m": r}, imps, [k])
    vals = [v for key, v in m.items() if not np.isnan(v) and not key.endswith("_all_m")]
    return float(np.mean(vals)) if vals else 0.0


# --- diagnostics ------------------------------------------------------------------


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
    "Impressions",
    "ColdStartData",
    "Retriever",
    "prepare_cold_start",
    "hits_at_k",
    "recall_at_k",
    "nmi",
    "kmeans_labels",
    "topk_overlap",
    "kendall_tau",
    "neighbours",
    "neighbour_agreement",
    "bijective_accuracy",
    "last_items",
    "mean_queries",
    "rank_items",
    "recall_report",
    "embedding_retriever",
    "evaluate_retrievers",
    "selection_score",
    "diagnostics",
]
