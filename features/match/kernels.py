"""The fast match op: `compute_match_features` (its slow twin is
`features.match.reference`).

It works one user at a time, users spread over `workers` threads: per user,
matrix products over tiles of at most `block_elems` similarities (candidates
x history window), exact top-k and threshold counts on each masked tile from
its block maxima, window means and recency means from float64 sums, one faiss
search for the user's distinct windows, semantic-ID counts by binary search.
Nothing loops over (user, candidate) pairs in Python, and a user's result
depends on its own data alone (every op single-threaded), so shards and
thread counts never change a bit.

Shape legend: N items, D embedding dim, M positives of one user, C candidate
rows of one user, R rows of one similarity tile, W its columns (history items,
padded to a multiple of BLOCK), U distinct history windows of one user,
K faiss neighbourhood, V semantic-ID levels.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import polars as pl

from features import schemas as S
from features.core.numeric import torch_threads
from features.match.config import DAY_S, PREFIX, MatchConfig
from features.match.space import Histories, ItemSpace

BLOCK = 32  # tile columns per block-max: exact top-k reads only the best blocks
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
    with torch_threads(1):  # torch, faiss and BLAS: one thread each in this thread
        if workers <= 1:
            for batch in batches:
                run(batch)
        else:
            with ThreadPoolExecutor(workers) as pool:
                list(pool.map(run, batches))
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
