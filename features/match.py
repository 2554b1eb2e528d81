"""Match features: how well a candidate item fits the user's positive history.

For every impression (user, candidate item, time) the history is the user's
positive events strictly earlier in time, capped to the last `history_cap`:
`pos_item_ids[pos_hist_end - L : pos_hist_end]` with L = min(pos_hist_end, cap)
(features/schemas.py). Ties in time are already excluded by `pos_hist_end`.
Item embeddings are L2-normalised, so dot products are cosines.

Columns (all prefixed `mf_`; every one but `mf_hist_len` is null when the
history is empty or the candidate has no embedding, never a silent zero):

    mf_cos_max        max_k s_k                      s_k = cos(candidate, history item k)
    mf_cos_mean       mean_k s_k
    mf_cos_top{k}     mean of the min(k, L) largest s_k (one column per k in `top_k`)
    mf_cos_count_gt   #{k : s_k > threshold}
    mf_cos_recency    sum_k w_k s_k / sum_k w_k      w_k = 2^(-(t - t_k) / half_life)
    mf_cos_last       s of the newest history item (sequence order breaks time ties)
    mf_faiss_rank     rank (1..K) of the candidate among all items by inner product
                      with the mean history embedding (faiss IndexFlatIP); K+1 if not in the top K
    mf_sid_l{l}       #history items whose semantic-ID prefix of length l equals the candidate's
    mf_hist_len       L (history items used; 0 for an empty history)

Shape legend: N items, D embedding dim, M positives of one user, C candidate
rows of one user, R rows of one similarity tile, W its columns (history items,
padded to a multiple of BLOCK), U distinct history windows of one user,
K faiss neighbourhood, V semantic-ID levels.

The fast path (`compute_match_features`) works one user at a time, users
spread over `workers` threads: per user, matrix products over tiles of at most
`block_elems` similarities (candidates x history window), exact top-k and
threshold counts on each masked tile from its block maxima, window means and
recency means from float64 sums, one faiss search for the user's distinct
windows, semantic-ID counts by binary search. Nothing loops over (user,
candidate) pairs in Python, and a user's result depends on its own data alone
(every op single-threaded), so shards and thread counts never change a bit.
`reference_match_features` is its slow, obvious twin (one loop per pair).

Cost: the products are 2*C*L*D flops per user; the faiss rank costs N*D per
distinct history window (one per ranking request, up to one per impression in
logs), which dominates for catalogues much larger than the histories.

>>> import numpy as np
>>> cfg = MatchConfig(top_k=(2,), sid_codebook_size=2, faiss_k=2)
>>> emb = np.eye(3, dtype=np.float32)
>>> space = ItemSpace.build(np.array([10, 11, 12]), emb, cfg)
>>> hist = Histories.from_lists([space.rows(np.array([10, 11]))[0]], [np.array([0, 86_400])])
>>> out = compute_match_features(space, hist, np.array([0]), space.rows(np.array([10]))[0], np.array([2]), cfg)
>>> float(out["mf_cos_max"][0]), float(out["mf_cos_mean"][0]), int(out["mf_hist_len"][0])
(1.0, 0.5, 2)
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import polars as pl

from features import schemas as S
from features.core.config import to_dict

PREFIX = "mf_"
BLOCK = 32  # tile columns per block-max: exact top-k reads only the best blocks
DAY_S = 86_400
# Recency weights of one group of windows are taken relative to its newest
# item; windows whose newest items lie within this many half-lives share a
# group, so no weight a window needs drops below 2^-EPOCH_HALF_LIVES (float64
# keeps 2^-1022), and prefix sums never cancel catastrophically.
EPOCH_HALF_LIVES = 256
# Users are computed in parallel (cfg.workers threads), each op single-threaded:
# results never depend on the thread count, short per-user ops waste no time
# waking OpenMP pools, and numpy's selections (single-threaded) scale too.
# A worker takes users in batches of about this many similarities.
BATCH_SIMS = 1 << 22


@dataclass(frozen=True)
class MatchConfig:
    """Match-feature job settings (pipeline config section `match`)."""

    history_cap: int = 10_000  # L = min(positives strictly earlier, history_cap)
    top_k: tuple[int, ...] = (5, 20)  # one mf_cos_top{k} column per k
    threshold: float = 0.5  # mf_cos_count_gt counts cosines strictly above this
    half_life_days: float = 30.0  # recency weight halves every this many days of event age
    faiss_k: int = 100  # neighbourhood size of mf_faiss_rank (K+1 when outside)
    sid_levels: int = 3  # residual k-means levels -> mf_sid_l1 .. mf_sid_l{levels}
    sid_codebook_size: int = 64  # centroids per level (clamped to the number of items)
    sid_niter: int = 20  # k-means iterations per level
    seed: int = 0  # k-means seed
    # "error": items of the interactions without a vector fail the job (exit 1);
    # "null": their candidate rows get null features and they are dropped from
    # histories (counted in the manifest)
    missing_items: Literal["error", "null"] = "error"  # items without a vector: fail, or null match features for them
    dim: int = 0  # expected embedding dimension; 0 accepts any (checked for consistency)
    shards: int = 8  # work units of an unsharded run: a killed run resumes after the last finished one
    workers: int = 0  # threads over users (0: one per CPU core); never changes the output
    block_elems: int = 1 << 20  # similarities per tile (memory and cache budget; ~4 MB)

    def __post_init__(self) -> None:
        if self.history_cap < 1:
            raise ValueError("history_cap must be >= 1")
        if not self.top_k or any(k < 1 for k in self.top_k) or len(set(self.top_k)) != len(self.top_k):
            raise ValueError("top_k must be a non-empty list of distinct integers >= 1")
        if not -1.0 <= self.threshold <= 1.0:
            raise ValueError("threshold must be a cosine in [-1, 1]")
        if not (self.half_life_days > 0 and math.isfinite(self.half_life_days)):
            raise ValueError("half_life_days must be > 0")
        if self.faiss_k < 1:
            raise ValueError("faiss_k must be >= 1")
        if not 1 <= self.sid_levels <= 8:
            raise ValueError("sid_levels must be in 1..8")
        if self.sid_codebook_size < 2:
            raise ValueError("sid_codebook_size must be >= 2")
        if self.sid_niter < 1:
            raise ValueError("sid_niter must be >= 1")
        if self.dim < 0:
            raise ValueError("dim must be >= 0 (0: any)")
        if self.shards < 1:
            raise ValueError("shards must be >= 1")
        if self.workers < 0:
            raise ValueError("workers must be >= 0 (0: one per CPU core)")
        if self.block_elems < 1024:
            raise ValueError("block_elems must be >= 1024")

    def columns(self) -> list[str]:
        """Output feature columns, in file order."""
        return [
            f"{PREFIX}cos_max",
            f"{PREFIX}cos_mean",
            *(f"{PREFIX}cos_top{k}" for k in self.top_k),
            f"{PREFIX}cos_count_gt",
            f"{PREFIX}cos_recency",
            f"{PREFIX}cos_last",
            f"{PREFIX}faiss_rank",
            *(f"{PREFIX}sid_l{level + 1}" for level in range(self.sid_levels)),
            f"{PREFIX}hist_len",
        ]

    def dtypes(self) -> dict[str, pl.DataType]:
        ints = {f"{PREFIX}cos_count_gt", f"{PREFIX}faiss_rank", f"{PREFIX}hist_len"}
        return {c: (pl.Int32 if c in ints or c.startswith(f"{PREFIX}sid_") else pl.Float32) for c in self.columns()}

    def relevant(self) -> dict[str, Any]:
        """Keys that change the output (`shards` and `workers` only split the work)."""
        d = to_dict(self)
        d.pop("shards")
        d.pop("workers")
        return d


# --- items -------------------------------------------------------------------


def l2_normalise(emb: np.ndarray) -> np.ndarray:
    """Rows scaled to unit norm (float32). Zero rows must be rejected before."""
    emb = np.asarray(emb, dtype=np.float32)
    norm = np.linalg.norm(emb.astype(np.float64), axis=1, keepdims=True)
    return (emb / norm).astype(np.float32)


def semantic_ids(emb: np.ndarray, levels: int, codebook_size: int, niter: int, seed: int) -> np.ndarray:
    """Residual k-means codes (V, N): level l clusters what levels < l left unexplained."""
    import faiss

    x = np.ascontiguousarray(emb, dtype=np.float32)  # (N, D)
    k = min(codebook_size, x.shape[0])
    codes = np.empty((levels, x.shape[0]), dtype=np.int64)
    for level in range(levels):
        # min_points_per_centroid=1: small catalogues are fine, silence faiss' warning
        km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed + level, verbose=False, min_points_per_centroid=1)
        km.train(x)
        _, assign = km.index.search(x, 1)  # (N, 1)
        codes[level] = assign[:, 0]
        x = np.ascontiguousarray(x - km.centroids[assign[:, 0]])
    return codes


def prefix_ids(codes: np.ndarray) -> np.ndarray:
    """(V, N) codes -> (V, N) dense ids of the code prefix up to each level:
    two items share id at level l iff their first l+1 codes agree."""
    out = np.empty_like(codes)
    prev = np.zeros(codes.shape[1], dtype=np.int64)
    for level in range(codes.shape[0]):
        key = prev * (int(codes[level].max()) + 1) + codes[level]
        _, prev = np.unique(key, return_inverse=True)
        out[level] = prev
    return out


@dataclass(frozen=True)
class ItemSpace:
    """Normalised item embeddings, their semantic-ID prefixes and a faiss index."""

    item_ids: np.ndarray  # (N,) int64, sorted
    emb: np.ndarray  # (N, D) float32, unit rows
    sid: np.ndarray  # (V, N) int64 prefix ids per level
    index: Any = field(repr=False)  # faiss.IndexFlatIP over emb

    @classmethod
    def build(cls, item_ids: np.ndarray, emb: np.ndarray, cfg: MatchConfig) -> ItemSpace:
        """`emb` rows must be finite and non-zero (the job validates files)."""
        import faiss

        order = np.argsort(np.asarray(item_ids, dtype=np.int64), kind="stable")
        ids = np.asarray(item_ids, dtype=np.int64)[order]
        e = np.ascontiguousarray(l2_normalise(np.asarray(emb)[order]))  # (N, D)
        codes = semantic_ids(e, cfg.sid_levels, cfg.sid_codebook_size, cfg.sid_niter, cfg.seed)
        index = faiss.IndexFlatIP(e.shape[1])
        index.add(e)
        return cls(ids, e, prefix_ids(codes), index)

    @property
    def dim(self) -> int:
        return int(self.emb.shape[1])

    def rows(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Row of each id in `emb` (-1 where absent) and the found mask."""
        ids = np.asarray(ids, dtype=np.int64)
        pos = np.minimum(np.searchsorted(self.item_ids, ids), len(self.item_ids) - 1)
        found = self.item_ids[pos] == ids
        return np.where(found, pos, -1), found


@dataclass(frozen=True)
class Histories:
    """Jagged positive histories of a block of users (time-sorted per user)."""

    offsets: np.ndarray  # (U+1,) int64: user u's positives are [offsets[u], offsets[u+1])
    item_rows: np.ndarray  # (M_total,) int64 rows into ItemSpace.emb
    timestamps: np.ndarray  # (M_total,) int64 unix seconds

    @classmethod
    def from_lists(cls, rows: Sequence[np.ndarray], timestamps: Sequence[np.ndarray]) -> Histories:
        lens = np.array([len(r) for r in rows], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
        flat = np.concatenate([np.asarray(r, np.int64) for r in rows]) if len(rows) else np.zeros(0, np.int64)
        ts = np.concatenate([np.asarray(t, np.int64) for t in timestamps]) if len(rows) else np.zeros(0, np.int64)
        return cls(offsets, flat, ts)

    def drop(self, keep: np.ndarray, hist_end: np.ndarray, row_user: np.ndarray) -> tuple[Histories, np.ndarray]:
        """Remove history events (keep[i] False) and remap each row's
        `hist_end` to the number of kept events before it."""
        kept_before = np.concatenate([[0], np.cumsum(keep, dtype=np.int64)])  # (M_total+1,)
        new_off = kept_before[self.offsets]
        start = self.offsets[row_user]
        new_end = kept_before[start + hist_end] - kept_before[start]
        return Histories(new_off, self.item_rows[keep], self.timestamps[keep]), new_end


# --- the fast path -------------------------------------------------------------


def _tiles(lo: np.ndarray, hi: np.ndarray, budget: int) -> list[tuple[int, int, int, int]]:
    """Split rows into consecutive tiles (r0, r1, c0, c1) whose padded
    similarity block (r1-r0) x (c1-c0 rounded up to BLOCK) stays within
    `budget` (one row at least). Rows are time-sorted, so windows grow and a
    tile's column span stays near one window."""
    out = []
    r0, n = 0, len(lo)
    while r0 < n:
        c_lo = np.minimum.accumulate(lo[r0:])
        c_hi = np.maximum.accumulate(hi[r0:])
        width = -(-(c_hi - c_lo) // BLOCK) * BLOCK
        cost = np.arange(1, n - r0 + 1) * width
        r1 = r0 + max(1, int(np.searchsorted(cost, budget, side="right")))
        out.append((r0, r1, int(c_lo[r1 - r0 - 1]), int(c_hi[r1 - r0 - 1])))
        r0 = r1
    return out


def _top_and_count(sim: np.ndarray, kmax: int, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Per row of sim (R, W), W a multiple of BLOCK: the largest `kmax` values
    sorted descending (-inf pads short rows) and the count above `threshold`.

    Any partition of a row into groups works: each of its top k values lies in
    a group whose max is among the k largest group maxima, so keeping those k
    groups before the final sort is exact, ties included. Groups whose maxima
    take one vectorised pass: strided groups (columns j, j+G, j+2G, ...) of 8
    for rows up to 64 k wide; wider rows keep k contiguous blocks of BLOCK
    first, then k strided groups of 8 inside them. What is left (8 k values
    per row) is sorted: numpy's SIMD sort beats partitioning at that size. The
    count reads only groups whose max exceeds the threshold: usually few,
    since most history items are not close to the candidate."""
    import torch

    r, w = sim.shape
    if w <= 8 * kmax:
        top = np.sort(sim, axis=1)[:, ::-1][:, :kmax]  # (R, <=k)
        return top, (sim > threshold).sum(axis=1)
    x, row_len = sim, w
    if w > 64 * kmax:
        nb = w // BLOCK
        bmax = torch.from_numpy(sim).view(r, nb, BLOCK).amax(dim=2).numpy()  # (R, nb)
        best = np.argpartition(bmax, nb - kmax, axis=1)[:, nb - kmax :]  # (R, k) block ids, unordered
        # np.take of whole blocks gathers several times faster than torch.index_select here
        x = np.take(sim.reshape(r * nb, BLOCK), (best + np.arange(r)[:, None] * nb).ravel(), axis=0)
        row_len = kmax * BLOCK
    g = row_len // 8  # 8 strided groups of g: group j holds columns j, j+g, ..., j+7g
    gmax = torch.from_numpy(x).view(r, 8, g).amax(dim=1).numpy()  # (R, g)
    keep = np.argpartition(gmax, g - kmax, axis=1)[:, g - kmax :]  # (R, k)
    first = keep + (np.arange(r) * row_len)[:, None]  # (R, k) flat index of each group's first value
    stride = np.arange(8) * g
    top = np.sort(np.take(x, (first[:, :, None] + stride).reshape(r, kmax * 8)), axis=1)[:, ::-1][:, :kmax]

    # count: groups of the whole row (contiguous blocks when wide, else strided) whose max passes
    gm = bmax if w > 64 * kmax else gmax
    hot = np.flatnonzero(gm > threshold)  # flat (row, group) ids
    if 4 * len(hot) > gm.size:  # dense: one full pass is cheaper than gathering
        return top, (sim > threshold).sum(axis=1)
    row, grp = np.divmod(hot, gm.shape[1])
    if w > 64 * kmax:
        vals = np.take(sim.reshape(-1, BLOCK), hot, axis=0)  # (H, BLOCK)
    else:
        vals = np.take(sim, (row * w + grp)[:, None] + stride)  # (H, 8)
    return top, np.bincount(row, weights=(vals > threshold).sum(axis=1), minlength=r)


class _Workspace:
    """One reusable tile buffer: large temporaries freed and re-allocated
    every tile would cost page faults comparable to the products themselves."""

    def __init__(self, elems: int) -> None:
        import torch

        self.buf = torch.empty(elems)

    def tile(self, rows: int, cols: int):
        import torch

        if rows * cols > self.buf.numel():
            self.buf = torch.empty(rows * cols)
        return self.buf[: rows * cols].view(rows, cols)


def _similarity_aggregates(
    cand,  # (C, D) torch float32
    hist_pad,  # (M + BLOCK, D) torch float32, zero rows after the history
    lo: np.ndarray,  # (C,) window start in the user's positives
    hi: np.ndarray,  # (C,) window end (exclusive)
    cfg: MatchConfig,
    ws: _Workspace,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row: max, top-k means (len(top_k), C), count above threshold."""
    import torch

    n = len(lo)
    kmax = max(cfg.top_k)
    ks = np.asarray(cfg.top_k)
    out_max = np.empty(n, np.float32)
    out_top = np.empty((len(cfg.top_k), n), np.float32)
    out_cnt = np.empty(n, np.int32)
    for r0, r1, c0, c1 in _tiles(lo, hi, cfg.block_elems):
        r = r1 - r0
        w = -(-(c1 - c0) // BLOCK) * BLOCK
        sim = ws.tile(r, w)  # (R, W)
        # rows past the history are zero padding: masked below with the window
        torch.mm(cand[r0:r1], hist_pad[c0 : c0 + w].T, out=sim)
        t_lo, t_hi = lo[r0:r1] - c0, hi[r0:r1] - c0
        if (t_lo == 0).all() and (t_hi == c1 - c0).all():
            sim[:, c1 - c0 :] = -math.inf  # same window on every row: only the padding
        else:
            col = torch.arange(w)
            outside = (col < torch.from_numpy(t_lo)[:, None]) | (col >= torch.from_numpy(t_hi)[:, None])  # (R, W)
            sim.masked_fill_(outside, -math.inf)
        top, count = _top_and_count(sim.numpy(), kmax, cfg.threshold)  # (R, k') sorted descending, (R,)
        csum = np.cumsum(np.where(np.isfinite(top), top, 0.0), axis=1, dtype=np.float64)  # (R, k')
        take = np.minimum(ks[:, None], (t_hi - t_lo)[None, :])  # (T, R) values averaged per k
        out_max[r0:r1] = top[:, 0]
        out_top[:, r0:r1] = csum.ravel()[np.arange(r) * csum.shape[1] + take - 1] / take
        out_cnt[r0:r1] = count
    return out_max, out_top, out_cnt


def _window_vectors(
    hist: np.ndarray,  # (M, D) float64
    ts: np.ndarray,  # (M,) int64
    ua: np.ndarray,  # (U,) window starts
    ub: np.ndarray,  # (U,) window ends (exclusive), ub > ua
    half_life_s: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Mean and recency-weighted mean history vector of each window (U, D).

    Recency weights 2^(-(t - t_k)/h) share the factor 2^(-t/h) within a
    window, which cancels in the weighted mean: the impression time t is not
    needed, only the history timestamps."""
    m, d = hist.shape
    length = (ub - ua).astype(np.float64)
    if len(ua) <= 8 and len(ua) * length.mean() <= 2 * m:
        # a few windows (a ranking request): direct sums beat prefix sums
        mean = np.stack([hist[a:b].sum(axis=0) for a, b in zip(ua, ub)]) / length[:, None]
        rec = np.empty_like(mean)
        for i, (a, b) in enumerate(zip(ua, ub)):
            w = np.exp2((ts[a:b] - ts[b - 1]) / half_life_s)  # (L,) newest weight 1
            rec[i] = (w @ hist[a:b]) / w.sum()
        return mean, rec
    prefix = np.zeros((m + 1, d))
    np.cumsum(hist, axis=0, out=prefix[1:])
    mean = (prefix[ub] - prefix[ua]) / length[:, None]
    rec = np.empty_like(mean)
    newest = ts[ub - 1]
    epoch = ((newest - newest.min()) // (EPOCH_HALF_LIVES * half_life_s)).astype(np.int64)
    for e in np.unique(epoch):
        sel = np.flatnonzero(epoch == e)
        a0, b0 = int(ua[sel].min()), int(ub[sel].max())
        w = np.exp2((ts[a0:b0] - newest[sel].max()) / half_life_s)  # (W,) <= 1
        pw = np.zeros((b0 - a0 + 1, d))
        np.cumsum(w[:, None] * hist[a0:b0], axis=0, out=pw[1:])
        pu = np.concatenate([[0.0], np.cumsum(w)])
        num = pw[ub[sel] - a0] - pw[ua[sel] - a0]
        rec[sel] = num / (pu[ub[sel] - a0] - pu[ua[sel] - a0])[:, None]
    return mean, rec


def _row_dots(cand: np.ndarray, vecs: np.ndarray, inv: np.ndarray) -> np.ndarray:
    """(V, C): row c of `cand` (C, D) dotted with vecs[v, inv[c]] (vecs (V, U, D)).

    Few distinct windows (a ranking request): one small product; many (a
    log, about one window per row): a gather and a row-wise dot."""
    v, u, _ = vecs.shape
    if u <= 32:
        return (cand @ vecs.reshape(v * u, -1).T).reshape(len(cand), v, u)[np.arange(len(cand)), :, inv].T
    return np.einsum("cd,vcd->vc", cand, vecs[:, inv])


def _faiss_rank(index: Any, queries: np.ndarray, inv: np.ndarray, cand_rows: np.ndarray, k: int) -> np.ndarray:
    """Rank 1..k of each row's candidate among the top k of its window's query, else k+1."""
    _, nbr = index.search(np.ascontiguousarray(queries, dtype=np.float32), min(k, index.ntotal))  # (U, K)
    hit = nbr[inv] == cand_rows[:, None]  # (C, K)
    return np.where(hit.any(axis=1), hit.argmax(axis=1) + 1, k + 1).astype(np.int32)


def _sid_counts(sid: np.ndarray, hist_rows: np.ndarray, cand_rows: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """(V, C) history items in [lo, hi) sharing the candidate's prefix id, per level.

    Sorting (prefix id, position) keys once per level turns each count into
    two binary searches instead of a C x M comparison."""
    m = len(hist_rows)
    out = np.empty((sid.shape[0], len(cand_rows)), np.int32)
    pos = np.arange(m, dtype=np.int64)
    for level in range(sid.shape[0]):
        keys = np.sort(sid[level, hist_rows] * (m + 1) + pos)  # (M,)
        base = sid[level, cand_rows] * (m + 1)  # (C,)
        out[level] = np.searchsorted(keys, base + hi) - np.searchsorted(keys, base + lo)
    return out


@contextmanager
def _single_threaded_ops() -> Iterator[None]:
    """torch and faiss single-threaded inside the block (this thread), restored after."""
    import faiss
    import torch

    prev_t, prev_f = torch.get_num_threads(), faiss.omp_get_max_threads()
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(prev_t)
        faiss.omp_set_num_threads(prev_f)


def _user_features(space: ItemSpace, hist: Histories, u: int, rows: np.ndarray, c_rows: np.ndarray,
                   hi: np.ndarray, lo: np.ndarray, cfg: MatchConfig, ws: _Workspace) -> dict[str, np.ndarray]:
    """Every column for the C rows of user u (windows [lo, hi) of its positives)."""
    import torch

    o0, o1 = int(hist.offsets[u]), int(hist.offsets[u + 1])
    h_rows = hist.item_rows[o0:o1]  # (M,)
    h_ts = hist.timestamps[o0:o1]
    cand32 = space.emb[c_rows]  # (C, D)
    hist32 = space.emb[h_rows]  # (M, D)
    hist_pad = torch.cat([torch.from_numpy(hist32), torch.zeros(BLOCK, space.dim)])  # (M + BLOCK, D)
    mx, top, cnt = _similarity_aggregates(torch.from_numpy(cand32), hist_pad, lo, hi, cfg, ws)
    cand64, hist64 = cand32.astype(np.float64), hist32.astype(np.float64)
    _, first, inv = np.unique(lo * (len(h_rows) + 1) + hi, return_index=True, return_inverse=True)
    mean_v, rec_v = _window_vectors(hist64, h_ts, lo[first], hi[first], cfg.half_life_days * DAY_S)  # (U, D)
    last_v = hist64[hi[first] - 1]  # (U, D) newest item of each window
    mean_c, rec_c, last_c = _row_dots(cand64, np.stack([mean_v, rec_v, last_v]), inv)  # (3, C)
    out = {
        f"{PREFIX}cos_max": mx,
        f"{PREFIX}cos_count_gt": cnt,
        f"{PREFIX}cos_mean": mean_c,
        f"{PREFIX}cos_recency": rec_c,
        f"{PREFIX}cos_last": last_c,
        f"{PREFIX}faiss_rank": _faiss_rank(space.index, mean_v, inv, c_rows, cfg.faiss_k),
    }
    for i, k in enumerate(cfg.top_k):
        out[f"{PREFIX}cos_top{k}"] = top[i]
    sid = _sid_counts(space.sid, h_rows, c_rows, lo, hi)
    for level in range(cfg.sid_levels):
        out[f"{PREFIX}sid_l{level + 1}"] = sid[level]
    return out


def compute_match_features(
    space: ItemSpace,
    hist: Histories,
    row_user: np.ndarray,  # (n,) index of each row's user in `hist`
    cand_rows: np.ndarray,  # (n,) candidate row in space.emb, -1: no embedding
    hist_end: np.ndarray,  # (n,) positives of the user strictly earlier (pos_hist_end)
    cfg: MatchConfig,
    on_user: Callable[[int], None] | None = None,  # progress callback, once per user
) -> dict[str, np.ndarray]:
    """All match-feature columns for n impression rows, plus `valid` (n,):
    False where features are null (empty history or unknown candidate).

    Rows may come in any order; rows of one user are best time-sorted (tiles
    then stay narrow). Users run on `cfg.workers` threads; every user's result
    depends on that user's data alone."""
    import faiss

    row_user = np.asarray(row_user, np.int64)
    cand_rows = np.asarray(cand_rows, np.int64)
    hist_end = np.asarray(hist_end, np.int64)
    n = len(row_user)
    length = np.minimum(hist_end, cfg.history_cap)
    valid = (length > 0) & (cand_rows >= 0)
    out: dict[str, np.ndarray] = {
        c: np.zeros(n, np.int32 if t == pl.Int32 else np.float32) for c, t in cfg.dtypes().items()
    }
    out[f"{PREFIX}hist_len"] = length.astype(np.int32)
    out["valid"] = valid
    idx = np.flatnonzero(valid)
    idx = idx[np.argsort(row_user[idx], kind="stable")]
    starts = np.flatnonzero(np.r_[True, row_user[idx][1:] != row_user[idx][:-1]]) if len(idx) else np.zeros(0, int)
    bounds = np.r_[starts, len(idx)]
    users = list(zip(bounds[:-1], bounds[1:]))
    # batches of users of about BATCH_SIMS similarities: few tasks, balanced work
    work = np.array([(s1 - s0) * int(length[idx[s0:s1]].max()) for s0, s1 in users], dtype=np.int64)
    cut = np.searchsorted(np.cumsum(work), np.arange(BATCH_SIMS, max(int(work.sum()), 1), BATCH_SIMS))
    batches = [b for b in np.split(np.arange(len(users)), np.unique(cut + 1)) if len(b)]
    local = threading.local()

    def run(batch: np.ndarray) -> None:
        if not hasattr(local, "ws"):
            local.ws = _Workspace(cfg.block_elems)
            faiss.omp_set_num_threads(1)  # OpenMP settings are per thread
        for b in batch:
            s0, s1 = users[b]
            rows = idx[s0:s1]  # (C,) this user's computable rows
            hi = hist_end[rows]
            u = int(row_user[rows[0]])
            feats = _user_features(space, hist, u, rows, cand_rows[rows], hi, hi - length[rows], cfg, local.ws)
            for c, v in feats.items():
                out[c][rows] = v
            if on_user is not None:
                on_user(1)

    workers = min(cfg.workers or os.cpu_count() or 1, len(batches))
    with _single_threaded_ops():
        if workers <= 1:
            for batch in batches:
                run(batch)
        else:
            with ThreadPoolExecutor(workers) as pool:
                list(pool.map(run, batches))
    return out


def reference_match_features(
    space: ItemSpace,
    hist: Histories,
    row_user: np.ndarray,
    cand_rows: np.ndarray,
    hist_end: np.ndarray,
    timestamps: np.ndarray,  # (n,) impression times: the literal recency definition uses them
    cfg: MatchConfig,
) -> dict[str, np.ndarray]:
    """Slow, obvious twin of `compute_match_features`: one Python loop per
    (user, candidate) pair, each feature straight from its definition."""
    n = len(row_user)
    out: dict[str, np.ndarray] = {
        c: np.zeros(n, np.int32 if t == pl.Int32 else np.float32) for c, t in cfg.dtypes().items()
    }
    valid = np.zeros(n, bool)
    k_search = min(cfg.faiss_k, space.index.ntotal)
    for j in range(n):
        u, e = int(row_user[j]), int(hist_end[j])
        length = min(e, cfg.history_cap)
        out[f"{PREFIX}hist_len"][j] = length
        if length == 0 or cand_rows[j] < 0:
            continue
        valid[j] = True
        o = int(hist.offsets[u])
        items = hist.item_rows[o + e - length : o + e]
        item_ts = hist.timestamps[o + e - length : o + e]
        c = space.emb[cand_rows[j]].astype(np.float64)
        sims = np.array([float(np.dot(c, space.emb[i].astype(np.float64))) for i in items])
        desc = np.sort(sims)[::-1]
        out[f"{PREFIX}cos_max"][j] = desc[0]
        out[f"{PREFIX}cos_mean"][j] = sims.mean()
        for k in cfg.top_k:
            out[f"{PREFIX}cos_top{k}"][j] = desc[: min(k, length)].mean()
        out[f"{PREFIX}cos_count_gt"][j] = int((sims > cfg.threshold).sum())
        w = 0.5 ** ((float(timestamps[j]) - item_ts) / (cfg.half_life_days * DAY_S))
        out[f"{PREFIX}cos_recency"][j] = (w * sims).sum() / w.sum()
        out[f"{PREFIX}cos_last"][j] = sims[-1]
        query = space.emb[items].astype(np.float64).mean(axis=0).astype(np.float32)[None, :]
        _, nbr = space.index.search(query, k_search)
        hits = np.flatnonzero(nbr[0] == cand_rows[j])
        out[f"{PREFIX}faiss_rank"][j] = hits[0] + 1 if len(hits) else cfg.faiss_k + 1
        for level in range(cfg.sid_levels):
            same = [space.sid[level, i] == space.sid[level, cand_rows[j]] for i in items]
            out[f"{PREFIX}sid_l{level + 1}"][j] = sum(same)
    out["valid"] = valid
    return out


def to_frame(keys: pl.DataFrame, feats: dict[str, np.ndarray], cfg: MatchConfig) -> pl.DataFrame:
    """Key columns (user_id, item_id, timestamp) + mf_ columns, nulls where not valid."""
    valid = pl.Series("__valid", feats["valid"])
    cols = [pl.Series(c, feats[c]).cast(t) for c, t in cfg.dtypes().items()]
    hist_len = f"{PREFIX}hist_len"
    return (
        keys.select(S.USER_ID, S.ITEM_ID, S.TIMESTAMP)
        .with_columns(*cols, valid)
        .with_columns(pl.when(pl.col("__valid")).then(pl.col(c)).alias(c) for c in cfg.columns() if c != hist_len)
        .drop("__valid")
    )


EMB_ITEM_ID = S.ITEM_ID
EMBEDDING = "embedding"  # List(Float32) column of an item-embeddings parquet


def _ids_text(ids: Sequence[int], limit: int = 10) -> str:
    ids = list(ids)
    return f"{ids[:limit]}{' ...' if len(ids) > limit else ''}"


def validate_embeddings(df: pl.DataFrame, file: str, dim: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Check an item-embeddings table and return (ids (N,), vectors (N, D) float32).

    Rejects, naming the file, the column and the first item ids: missing
    columns, null ids or vectors, duplicate ids, ragged lengths, a dimension
    other than `dim` (when > 0), NaN/inf/null values, all-zero vectors (no
    direction to normalise)."""
    from features.core.errors import DataError, SchemaError

    for col in (EMB_ITEM_ID, EMBEDDING):
        if col not in df.columns:
            raise SchemaError(f"missing column {col!r} (found {df.columns})", file=file, column=col)
    if not df.schema[EMB_ITEM_ID].is_integer():
        raise SchemaError(f"expected an integer column, got {df.schema[EMB_ITEM_ID]}", file=file, column=EMB_ITEM_ID)
    etype = df.schema[EMBEDDING]
    if not (isinstance(etype, (pl.List, pl.Array)) and etype.inner.is_float()):
        raise SchemaError(f"expected List(Float32), got {etype}", file=file, column=EMBEDDING)
    df = df.with_row_index("__row", offset=1)
    for col in (EMB_ITEM_ID, EMBEDDING):
        bad = df.filter(pl.col(col).is_null())
        if bad.height:
            raise DataError(f"{bad.height} null values", file=file, column=col, rows=bad["__row"].to_list())
    dup = df.filter(pl.col(EMB_ITEM_ID).is_duplicated())
    if dup.height:
        ids = dup[EMB_ITEM_ID].unique(maintain_order=True).to_list()
        raise DataError(
            f"duplicate item ids {_ids_text(ids)}: one vector per item",
            file=file,
            column=EMB_ITEM_ID,
            rows=dup["__row"].to_list(),
        )
    lens = df[EMBEDDING].list.len() if isinstance(etype, pl.List) else pl.Series([etype.size] * df.height)
    if df.height == 0:
        raise DataError("no rows", file=file, column=EMBEDDING)
    common = int(lens.mode().sort()[-1])
    if lens.n_unique() > 1:
        bad = df.filter(lens != common)
        raise DataError(
            f"ragged vectors: most have {common} values, items {_ids_text(bad[EMB_ITEM_ID].to_list())} do not",
            file=file,
            column=EMBEDDING,
            rows=bad["__row"].to_list(),
        )
    if common == 0 or (dim and common != dim):
        raise DataError(
            f"vectors have dimension {common}, expected {dim or '>= 1'} (items {_ids_text(df[EMB_ITEM_ID].head(10).to_list())})",
            file=file,
            column=EMBEDDING,
        )
    flat = df[EMBEDDING].explode() if isinstance(etype, pl.List) else df[EMBEDDING].arr.explode()
    vec = flat.cast(pl.Float64).to_numpy().reshape(df.height, common).astype(np.float32)  # (N, D)
    ids = df[EMB_ITEM_ID].cast(pl.Int64).to_numpy()
    for what, bad_mask in (
        ("NaN, inf or null values (or values beyond float32)", ~np.isfinite(vec).all(axis=1)),
        ("all-zero vectors (cannot be L2-normalised)", ~(np.abs(vec) > 0).any(axis=1)),
    ):
        if bad_mask.any():
            rows = (np.flatnonzero(bad_mask) + 1).tolist()
            raise DataError(
                f"{int(bad_mask.sum())} items with {what}: {_ids_text(ids[bad_mask].tolist())}",
                file=file,
                column=EMBEDDING,
                rows=rows,
            )
    return ids, vec


def check_missing_items(emb_ids: np.ndarray, needed: np.ndarray, file: str, policy: str) -> np.ndarray:
    """Item ids of the interactions without a vector; under policy "error" a DataError."""
    from features.core.errors import DataError

    missing = np.setdiff1d(np.asarray(needed, np.int64), np.asarray(emb_ids, np.int64))
    if len(missing) and policy == "error":
        raise DataError(
            f"{len(missing)} items of the interactions have no vector: {_ids_text(missing.tolist())} "
            "(set match.missing_items: null to give their rows null match features)",
            file=file,
            column=EMB_ITEM_ID,
        )
    return missing


def stable_shard(user_ids: np.ndarray, n: int) -> np.ndarray:
    """Shard of each user in 0..n-1 from a fixed integer hash (splitmix64),
    the same on every machine, run and library version."""
    z = np.asarray(user_ids, dtype=np.int64).astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return (z % np.uint64(n)).astype(np.int64)


__all__ = [
    "MatchConfig",
    "ItemSpace",
    "Histories",
    "compute_match_features",
    "reference_match_features",
    "to_frame",
    "stable_shard",
    "semantic_ids",
    "prefix_ids",
    "l2_normalise",
    "validate_embeddings",
    "check_missing_items",
]
