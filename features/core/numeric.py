"""Small numeric helpers every package shares (one of each):
`json_safe` (NaN/inf -> null for JSON), `l2_normalise` (unit rows),
`finite_mean_std` (standardisation statistics that do not overflow),
`torch_threads` (thread limits for a block, restored after).

>>> json_safe({"auc": float("nan"), "k": [1.0, float("inf")]})
{'auc': None, 'k': [1.0, None]}
>>> l2_normalise(np.array([[3.0, 4.0]])).tolist()
[[0.6000000238418579, 0.800000011920929]]
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import numpy as np


def json_safe(obj: Any) -> Any:
    """A copy that JSON can hold strictly (`allow_nan=False`): NaN and +-inf
    become None, numpy scalars become Python numbers, recursively through
    mappings, lists and tuples (tuples become lists)."""
    if isinstance(obj, Mapping):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    return obj


Z_CLIP = 1e4  # standardised values are clipped to +-Z_CLIP (|z| <= sqrt(n - 1) on the rows the stats came from)


def finite_mean_std(vals: np.ndarray) -> tuple[float, float]:
    """Mean and standard deviation of finite float values (one or more), without
    overflow: the plain formulas square or sum values such as 1e155 or 1e308 into
    inf, and (x - mean) / inf read a whole column as 0 (or NaN). Falls back to the
    values scaled by their largest magnitude; the std is capped at float64's max."""
    with np.errstate(over="ignore", invalid="ignore"):
        mean, std = float(vals.mean()), float(vals.std())
    if math.isfinite(mean) and math.isfinite(std):
        return mean, std
    scale = float(np.abs(vals).max())
    unit = vals / scale
    with np.errstate(over="ignore"):
        std = min(float(unit.std()) * scale, float(np.finfo(np.float64).max))  # 2 x 1e308 would be inf
    return float(unit.mean()) * scale, std


def l2_normalise(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows (last axis) scaled to unit norm, as float32; the norm is taken in
    float64 and floored at `eps`, so an all-zero row stays zero."""
    x = np.asarray(x)
    norm = np.linalg.norm(x.astype(np.float64, copy=False), axis=-1, keepdims=True)
    return (x / np.maximum(norm, eps)).astype(np.float32)


@contextmanager
def torch_threads(n: int, *, faiss_too: bool = True) -> Iterator[None]:
    """torch (and faiss, and BLAS/OpenMP through threadpoolctl) limited to `n`
    threads for the block, restored after; n <= 0 leaves everything as is.
    On a shared 2-core machine, two OpenMP threads that wait on each other
    made small workloads up to 15x slower."""
    if n <= 0:
        yield
        return
    import torch
    from threadpoolctl import threadpool_limits

    old = torch.get_num_threads()
    faiss = None
    if faiss_too:
        import faiss
    old_faiss = faiss.omp_get_max_threads() if faiss else None
    torch.set_num_threads(n)
    if faiss:
        faiss.omp_set_num_threads(n)
    try:
        with threadpool_limits(limits=n):
            yield
    finally:
        torch.set_num_threads(old)
        if faiss:
            faiss.omp_set_num_threads(old_faiss)
