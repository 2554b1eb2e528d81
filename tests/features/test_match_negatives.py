"""Match features over the negative half of the history (`match.negatives`):
mf_neg_* against a direct per-row computation, the positive columns
unchanged, and the sampled-negative path reading the same histories."""

from __future__ import annotations

import dataclasses

import numpy as np
import polars as pl
import pytest
from polars.testing import assert_frame_equal

from features import schemas as S
from features.jobs import build_match_features
from features.match import MatchConfig
from features.match.config import NEGATIVE_COLUMNS
from features.schemas import MATCH_FILE

FAST = MatchConfig(top_k=(5, 20), faiss_k=20, sid_codebook_size=8, sid_niter=5, shards=3)
QUIET = dict(log=lambda _m: None, progress=False)


@pytest.fixture(scope="module")
def emb(synthetic_features, tmp_path_factory):
    ids = pl.read_parquet(synthetic_features / "items.parquet")[S.ITEM_ID].to_numpy()
    vec = np.random.default_rng(4).standard_normal((len(ids), 12)).astype(np.float32)
    path = tmp_path_factory.mktemp("emb") / "emb.parquet"
    pl.DataFrame({"item_id": pl.Series(ids, dtype=pl.Int64),
                  "embedding": pl.Series(list(vec), dtype=pl.List(pl.Float32))}).write_parquet(path)
    return path


@pytest.fixture(scope="module")
def runs(synthetic_features, emb, tmp_path_factory):
    root = tmp_path_factory.mktemp("neg")
    out = {}
    for name, cfg in {"off": FAST, "on": dataclasses.replace(FAST, negatives=True),
                      "cap": dataclasses.replace(FAST, negatives=True, history_cap=4)}.items():
        build_match_features(synthetic_features, emb, root / name, cfg, **QUIET)
        out[name] = pl.read_parquet(root / name / MATCH_FILE)
    return out


def expected(features, emb_file, cap):
    """mf_neg_* row by row: the user's label-0 events at strictly earlier times, the last `cap` of them."""
    inter = pl.read_parquet(features / "interactions.parquet")
    e = pl.read_parquet(emb_file)
    vec = np.array(e["embedding"].to_list(), np.float64)
    vec /= np.linalg.norm(vec, axis=1, keepdims=True)
    row_of = {int(i): k for k, i in enumerate(e["item_id"].to_numpy())}
    rows = []
    for (_,), g in inter.group_by([S.USER_ID], maintain_order=True):
        ids, ts, lab = (g[c].to_numpy() for c in (S.ITEM_ID, S.TIMESTAMP, S.LABEL))
        for k in range(g.height):
            earlier = np.flatnonzero((ts < ts[k]) & (lab == 0))[-cap:]
            n = len(earlier)
            if n:
                cos = vec[[row_of[int(i)] for i in ids[earlier]]] @ vec[row_of[int(ids[k])]]
                rows.append((cos.max(), cos.mean(), n))
            else:
                rows.append((None, None, 0))
    return pl.DataFrame(rows, schema={"mf_neg_cos_max": pl.Float64, "mf_neg_cos_mean": pl.Float64,
                                      "mf_neg_hist_len": pl.Int32}, orient="row"), inter


@pytest.mark.parametrize("run,cap", [("on", FAST.history_cap), ("cap", 4)])
def test_negative_columns_equal_a_direct_computation(synthetic_features, emb, runs, run, cap):
    want, inter = expected(synthetic_features, emb, cap)
    got = runs[run]
    assert got.columns[-3:] == list(NEGATIVE_COLUMNS)
    assert_frame_equal(got.select(S.USER_ID, S.ITEM_ID, S.TIMESTAMP), inter.select(S.USER_ID, S.ITEM_ID, S.TIMESTAMP))
    assert_frame_equal(got.select(NEGATIVE_COLUMNS).cast({"mf_neg_cos_max": pl.Float64, "mf_neg_cos_mean": pl.Float64}),
                       want, abs_tol=2e-6)
    # the planted data has both kinds of history, so the check is not vacuous
    assert 0 < got["mf_neg_hist_len"].is_in([0]).sum() < got.height
    assert (got["mf_neg_cos_mean"].is_null() == (got["mf_neg_hist_len"] == 0)).all()


def test_positive_columns_do_not_change(runs):
    off, on = runs["off"], runs["on"]
    assert on.columns == off.columns + list(NEGATIVE_COLUMNS)
    assert_frame_equal(on.select(off.columns), off)


def test_negatives_are_part_of_the_key():
    assert FAST.relevant() != dataclasses.replace(FAST, negatives=True).relevant()
    assert "mf_neg_cos_mean" not in FAST.columns()
