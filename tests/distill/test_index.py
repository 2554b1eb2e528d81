"""faiss indexes: exact search equals brute force; IVF/HNSW recall on random data."""

from __future__ import annotations

import numpy as np
import pytest

from distill.index import IndexConfig, build_index, gpu_available, search, search_excluding


def _data(n=2000, d=32, q=200, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((20, d))
    x = centers[rng.integers(0, 20, n)] + 0.3 * rng.standard_normal((n, d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    qs = x[rng.integers(0, n, q)] + 0.1 * rng.standard_normal((q, d))
    return x.astype(np.float32), qs.astype(np.float32)


def _brute(x, q, k):
    s = q @ x.T
    return np.argsort(-s, axis=1, kind="stable")[:, :k], np.sort(s, axis=1)[:, ::-1][:, :k]


def test_flat_equals_brute_force():
    x, q = _data()
    scores, ids = search(build_index(x), q, 10)
    want_ids, want_scores = _brute(x, q, 10)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-5)
    assert (ids == want_ids).mean() > 0.999  # ties aside
    assert not gpu_available()  # this machine: CPU only, and nothing complained


@pytest.mark.parametrize("cfg", [IndexConfig(kind="ivf", nlist=40, nprobe=8), IndexConfig(kind="hnsw", hnsw_m=16, ef_search=64)])
def test_approximate_indexes_recall(cfg):
    x, q = _data()
    _, ids = search(build_index(x, cfg), q, 10)
    want, _ = _brute(x, q, 10)
    recall = np.mean([len(np.intersect1d(a, b)) / 10 for a, b in zip(ids, want)])
    assert recall >= 0.9, recall


def test_search_excluding_drops_history_and_pads():
    x = np.eye(4, dtype=np.float32) * np.array([[4], [3], [2], [1]], dtype=np.float32)
    index = build_index(x)
    q = np.ones((2, 4), dtype=np.float32)  # scores 4, 3, 2, 1
    ids = search_excluding(index, q, 2, [np.array([0]), np.array([0, 1, 2])])
    np.testing.assert_array_equal(ids, [[1, 2], [3, -1]])
    # more results asked than exist: -1 padding
    np.testing.assert_array_equal(search_excluding(index, q[:1], 6, [np.zeros(0, np.int64)])[0], [0, 1, 2, 3, -1, -1])
