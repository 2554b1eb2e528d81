"""faiss inner-product indexes for item retrieval.

`IndexFlatIP` (exact) by default; IVF and HNSW for catalogs where exact search
is too slow. A GPU copy is made only when faiss itself reports a GPU
(`faiss.get_num_gpus() > 0`: faiss-gpu installed and CUDA present); faiss-gpu
on a CPU-only machine does not fall back by itself (NOTES.md), so every other
case stays on CPU without a word. Vectors are expected L2-normalised when
cosine similarity is meant.

Shape legend:
    N  indexed vectors (items)
    Q  queries
    D  dim
    K  results per query
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from distill.config import IndexConfig

GPU_MAX_K = 2048  # faiss GPU search cannot return more per query
_GPU_RESOURCES: list = []


def gpu_available() -> bool:
    import faiss

    try:
        return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    except Exception:  # a broken CUDA install: behave as CPU-only
        return False


def build_index(vectors: np.ndarray, cfg: IndexConfig = IndexConfig(), seed: int = 0):
    """An inner-product faiss index over `vectors` (N, D), ready to search."""
    import faiss

    x = np.ascontiguousarray(vectors, dtype=np.float32)  # (N, D)
    n, d = x.shape
    if cfg.kind == "flat" or (cfg.kind == "ivf" and n // 39 <= 1):
        # an IVF of one cluster is an exact search: skip its k-means (and
        # faiss's warning about too few training points)
        index = faiss.IndexFlatIP(d)
    elif cfg.kind == "ivf":
        nlist = max(1, min(cfg.nlist, n // 39))
        # the factory owns its quantizer (no Python object to keep alive)
        index = faiss.index_factory(d, f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)
        ivf = faiss.extract_index_ivf(index)
        ivf.cp.seed = seed
        index.train(x)
        ivf.nprobe = min(cfg.nprobe, nlist)
    elif cfg.kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, cfg.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = cfg.ef_construction
        index.hnsw.efSearch = cfg.ef_search
    else:  # pragma: no cover - Literal checked by the config loader
        raise ValueError(f"unknown index kind {cfg.kind!r}")
    index.add(x)
    if cfg.use_gpu and cfg.kind != "hnsw" and gpu_available():  # HNSW has no GPU version
        if not _GPU_RESOURCES:  # one per process, alive as long as the indexes using it
            _GPU_RESOURCES.append(faiss.StandardGpuResources())
        return faiss.index_cpu_to_gpu(_GPU_RESOURCES[0], 0, index)
    return index


def _max_k(index) -> int:
    return min(index.ntotal, GPU_MAX_K) if "Gpu" in type(index).__name__ else index.ntotal


def search(index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores (Q, K), ids (Q, K)); K = min(k, N); missing results are id -1."""
    q = np.ascontiguousarray(queries, dtype=np.float32)  # (Q, D)
    k = max(1, min(k, _max_k(index)))
    return index.search(q, k)


def search_excluding(index, queries: np.ndarray, k: int, exclude: Sequence[np.ndarray]) -> np.ndarray:
    """Top-k ids (Q, k) per query with each query's `exclude` ids removed.

    faiss has no per-query exclusion, so each query asks for k + len(exclude)
    results and drops the excluded ones. Queries are grouped by power-of-two
    exclusion size, so one long history does not make every query fetch
    hundreds of extra results. Rows that run out of results are padded with -1.
    """
    nq = len(queries)
    out = np.full((nq, k), -1, dtype=np.int64)  # (Q, k)
    if nq == 0:
        return out
    sizes = np.array([len(e) for e in exclude], dtype=np.int64)
    bucket = np.ceil(np.log2(np.maximum(sizes, 1))).astype(np.int64)
    for b in np.unique(bucket):
        rows = np.flatnonzero(bucket == b)
        _, ids = search(index, queries[rows], k + int(sizes[rows].max()))  # (q, m)
        # one vectorised membership test for the whole group: key = row * N + id
        n = max(index.ntotal, 1)
        ex_rows = np.repeat(np.arange(len(rows)), sizes[rows])
        ex_vals = np.concatenate([np.asarray(exclude[r], dtype=np.int64) for r in rows]) if sizes[rows].sum() else np.zeros(0, np.int64)
        keep = (ids >= 0) & ~np.isin(np.arange(len(rows))[:, None] * n + ids, ex_rows * n + ex_vals)  # (q, m)
        rank = np.cumsum(keep, 1)  # (q, m): 1-based position among kept results
        sel = keep & (rank <= k)
        r, _ = np.nonzero(sel)
        out[rows[r], rank[sel] - 1] = ids[sel]
    return out


__all__ = ["IndexConfig", "build_index", "gpu_available", "search", "search_excluding"]
