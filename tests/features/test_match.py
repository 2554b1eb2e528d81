"""Match features: hand-computed golden case, parity with the per-pair
reference, no leakage, shards, resume, bad embeddings, CLI contract."""

from __future__ import annotations

import dataclasses
import sys
import types

import numpy as np
import polars as pl
import pytest
from polars.testing import assert_frame_equal

from features import match as M
from features import schemas as S
from features.core.errors import DataError, SchemaError
from features.jobs import (
    build_match_features,
    concat_match_shards,
    match_shard_dir,
    parse_shard,
)
from features.core.errors import UsageError
from features.match import Histories, ItemSpace, MatchConfig, compute_match_features, reference_match_features
from features.match import kernels as K
from features.schemas import MATCH_FILE

DAY = 86_400
T0 = 1_000_000_000
# small and quick: a few k-means iterations, a short faiss neighbourhood
FAST = MatchConfig(top_k=(5, 20), faiss_k=20, sid_codebook_size=8, sid_niter=5, shards=3)


def write_embeddings(path, ids, vec, dtype=pl.List(pl.Float32)):
    pl.DataFrame({"item_id": pl.Series(ids, dtype=pl.Int64), "embedding": pl.Series(list(vec), dtype=dtype)}).write_parquet(path)
    return path


def random_embeddings(path, ids, dim=16, seed=0):
    vec = np.random.default_rng(seed).standard_normal((len(ids), dim)).astype(np.float32)
    return write_embeddings(path, ids, vec.tolist())


def item_ids(features_dir):
    return pl.read_parquet(features_dir / "items.parquet")[S.ITEM_ID].to_numpy()


# --- the hand-computed case ------------------------------------------------------
#
# items (unit vectors)      A=(1,0,0) B=(.6,.8,0) C=(0,1,0) D=(0,.6,.8) E=(.8,0,.6)
# cosines                   AB .6  AC 0  AD 0  AE .8  BC .8  BD .48  BE .48  CD .6  CE 0  DE .48
# user 0 positives          A@0d  C@1d  D@2d  B@3d          cap 3, top_k (2, 5), threshold .5,
# half-life 1 day: recency weights of the window items, newest first, are 1, 1/2, 1/4.
# semantic-ID prefix ids    level1 A0 B0 C1 D1 E0 / level2 A0 B1 C2 D2 E0 / level3 A0 B1 C2 D3 E4
HAND_VEC = np.array([[1, 0, 0], [0.6, 0.8, 0], [0, 1, 0], [0, 0.6, 0.8], [0.8, 0, 0.6]], dtype=np.float32)
HAND_SID = np.array([[0, 0, 1, 1, 0], [0, 1, 2, 2, 0], [0, 1, 2, 3, 4]])
A, B, C, D, E = range(5)
# rows: (user, candidate row, pos_hist_end, impression time in days)
HAND_ROWS = [
    (0, E, 0, -1.0),  # r0 empty history
    (0, B, 2, 1.5),  # r1 window A C
    (0, E, 2, 1.5),  # r2 window A C
    (0, A, 3, 2.5),  # r3 window A C D
    (0, C, 4, 3.5),  # r4 window C D B (cap 3 drops A)
    (0, B, 4, 3.5),  # r5 window C D B
    (1, A, 0, 0.0),  # r6 a user without positives
    (0, -1, 3, 2.5),  # r7 a candidate without a vector
]
N = None
HAND_EXPECTED = {
    # r0  r1   r2   r3     r4    r5    r6 r7
    "mf_cos_max": [N, 0.8, 0.8, 1.0, 1.0, 1.0, N, N],
    "mf_cos_mean": [N, 0.7, 0.4, 1 / 3, 0.8, 0.76, N, N],
    "mf_cos_top2": [N, 0.7, 0.4, 0.5, 0.9, 0.9, N, N],
    "mf_cos_top5": [N, 0.7, 0.4, 1 / 3, 0.8, 0.76, N, N],  # fewer than 5: mean of all
    "mf_cos_count_gt": [N, 2, 1, 1, 3, 2, N, N],
    "mf_cos_recency": [N, 1.1 / 1.5, 0.4 / 1.5, 0.25 / 1.75, 1.35 / 1.75, 1.44 / 1.75, N, N],
    "mf_cos_last": [N, 0.8, 0.0, 0.0, 0.8, 1.0, N, N],
    # r1: mean(A,C) scores A .5 B .7 C .5 D .3 E .4 -> B first; r2: E 4th > K=2 -> 3
    # r3: A last of 5 -> 3; r4: mean(C,D,B) ~ (.6,2.4,.8): C 2.4 B 2.28 D 2.08 -> C 1, B 2
    "mf_faiss_rank": [N, 1, 3, 3, 1, 2, N, N],
    "mf_sid_l1": [N, 1, 1, 1, 2, 1, N, N],
    "mf_sid_l2": [N, 0, 1, 1, 2, 1, N, N],
    "mf_sid_l3": [N, 0, 0, 1, 1, 1, N, N],
    "mf_hist_len": [0, 2, 2, 3, 3, 3, 0, 3],
}


def hand_case():
    cfg = MatchConfig(history_cap=3, top_k=(2, 5), threshold=0.5, half_life_days=1.0, faiss_k=2, sid_codebook_size=2)
    space = dataclasses.replace(ItemSpace.build(np.arange(5) + 100, HAND_VEC, cfg), sid=HAND_SID)
    none = np.array([], np.int64)
    hist = Histories.from_lists([np.array([A, C, D, B]), none], [T0 + DAY * np.arange(4), none])
    user, cand, end, days = (np.array(x) for x in zip(*HAND_ROWS))
    return cfg, space, hist, user, cand, end, (T0 + days * DAY).astype(np.int64)


def expected_frame(cfg):
    return pl.DataFrame(HAND_EXPECTED, schema={c: cfg.dtypes()[c] for c in HAND_EXPECTED})


def test_hand_computed_case_every_column():
    cfg, space, hist, user, cand, end, ts = hand_case()
    assert cfg.columns() == list(HAND_EXPECTED)
    keys = pl.DataFrame({S.USER_ID: user, S.ITEM_ID: cand, S.TIMESTAMP: ts})
    for feats in (
        compute_match_features(space, hist, user, cand, end, cfg),
        reference_match_features(space, hist, user, cand, end, ts, cfg),
    ):
        got = M.to_frame(keys, feats, cfg).drop(S.USER_ID, S.ITEM_ID, S.TIMESTAMP)
        assert_frame_equal(got, expected_frame(cfg), abs_tol=1e-6)


def test_hand_case_rows_in_any_order_give_the_same_features():
    cfg, space, hist, user, cand, end, ts = hand_case()
    perm = np.random.default_rng(0).permutation(len(user))
    feats = compute_match_features(space, hist, user[perm], cand[perm], end[perm], cfg)
    keys = pl.DataFrame({S.USER_ID: user[perm]})
    got = M.to_frame(keys.with_columns(pl.lit(0).alias(S.ITEM_ID), pl.lit(0).alias(S.TIMESTAMP)), feats, cfg)
    assert_frame_equal(got.drop(S.USER_ID, S.ITEM_ID, S.TIMESTAMP), expected_frame(cfg)[perm], abs_tol=1e-6)


# --- parity with the slow twin ----------------------------------------------------


def random_case(seed, *, users=10, n_items=400, dim=12, max_pos=900, cap=500, half_life=3.0, block=1 << 14, request=False):
    rng = np.random.default_rng(seed)
    cfg = MatchConfig(
        history_cap=cap, top_k=(3, 20), threshold=0.25, half_life_days=half_life, faiss_k=15,
        sid_codebook_size=6, sid_niter=5, block_elems=block, seed=seed,
    )
    space = ItemSpace.build(rng.permutation(n_items) * 7 + 3, rng.standard_normal((n_items, dim)).astype(np.float32), cfg)
    rows, stamps, user, cand, end, ts = [], [], [], [], [], []
    for u in range(users):
        m = int(rng.integers(0, max_pos))
        rows.append(rng.integers(0, n_items, m))
        t = np.sort(rng.integers(0, 400 * DAY, m)) + T0
        stamps.append(t)
        ends = np.sort(rng.integers(0, m + 1, int(rng.integers(1, 40))))
        if request:  # a ranking request: every candidate scored after the whole history
            ends = np.full(int(rng.integers(20, 120)), m)
        for e in ends:
            user.append(u)
            cand.append(int(rng.integers(0, n_items)) if rng.random() > 0.05 else -1)
            end.append(e)
            ts.append((t[e - 1] if e else T0) + int(rng.integers(1, 3 * DAY)))
    hist = Histories.from_lists(rows, stamps)
    return cfg, space, hist, *(np.array(x) for x in (user, cand, end, ts))


@pytest.mark.parametrize(
    "seed,kw",
    [
        (1, {}),  # block-max top-k path (windows up to 500 wide), many tiles per user
        (2, {"cap": 40, "max_pos": 120}),  # short windows: plain top-k
        (3, {"half_life": 0.02, "cap": 10_000}),  # weights spanning >256 half-lives: several epochs
        (4, {"block": 1024}),  # one row per tile
        (7, {"request": True, "users": 3, "max_pos": 3000, "cap": 2000}),  # one window per user: direct sums, wide rows
    ],
)
def test_vectorised_matches_reference(seed, kw):
    cfg, space, hist, user, cand, end, ts = random_case(seed, **kw)
    fast = compute_match_features(space, hist, user, cand, end, cfg)
    ref = reference_match_features(space, hist, user, cand, end, ts, cfg)
    np.testing.assert_array_equal(fast["valid"], ref["valid"])
    ok = fast["valid"]
    assert ok.sum() > 50
    for col in cfg.columns():
        if cfg.dtypes()[col] == pl.Int32:
            np.testing.assert_array_equal(fast[col][ok], ref[col][ok], err_msg=col)
        else:
            np.testing.assert_allclose(fast[col][ok], ref[col][ok], atol=2e-6, rtol=0, err_msg=col)


def test_features_use_only_the_positives_before_the_row():
    """Replacing every positive at or after a row's pos_hist_end changes none of its features."""
    cfg, space, hist, user, cand, end, _ = random_case(5, max_pos=300)
    base = compute_match_features(space, hist, user, cand, end, cfg)
    rng = np.random.default_rng(9)
    cut = {u: int(end[user == u].min()) for u in np.unique(user)}  # the earliest row of each user
    items = hist.item_rows.copy()
    for u, c in cut.items():
        o0, o1 = hist.offsets[u], hist.offsets[u + 1]
        items[o0 + c : o1] = rng.integers(0, len(space.item_ids), o1 - o0 - c)
    future = compute_match_features(space, dataclasses.replace(hist, item_rows=items), user, cand, end, cfg)
    first = np.array([end[j] == cut[user[j]] for j in range(len(user))])
    for col in cfg.columns():
        np.testing.assert_array_equal(base[col][first], future[col][first], err_msg=col)


def test_semantic_ids_are_residual_prefixes():
    rng = np.random.default_rng(0)
    centres = np.repeat(np.eye(4, 8) * 10, 50, axis=0)  # 4 far clusters of 50
    x = (centres + rng.standard_normal((200, 8))).astype(np.float32)
    codes = M.semantic_ids(x, 3, 4, 10, seed=1)
    np.testing.assert_array_equal(codes, M.semantic_ids(x, 3, 4, 10, seed=1))  # seeded
    assert len(np.unique(codes[0])) == 4 and all(len(np.unique(codes[0][i * 50 : i * 50 + 50])) == 1 for i in range(4))
    pre = M.prefix_ids(codes)
    for level in range(1, 3):  # finer levels refine coarser ones
        same = pre[level][:, None] == pre[level][None, :]
        assert (pre[level - 1][:, None] == pre[level - 1][None, :])[same].all()
        assert len(np.unique(pre[level])) >= len(np.unique(pre[level - 1]))
    tuples = {tuple(c) for c in codes[:2].T}
    assert len(np.unique(pre[1])) == len(tuples)


def test_config_validation_and_columns():
    assert MatchConfig().columns() == [
        "mf_cos_max", "mf_cos_mean", "mf_cos_top5", "mf_cos_top20", "mf_cos_count_gt", "mf_cos_recency",
        "mf_cos_last", "mf_faiss_rank", "mf_sid_l1", "mf_sid_l2", "mf_sid_l3", "mf_hist_len",
    ]
    assert MatchConfig().history_cap == 10_000 and MatchConfig().faiss_k == 100
    for bad in ({"history_cap": 0}, {"top_k": ()}, {"top_k": (5, 5)}, {"threshold": 2.0}, {"half_life_days": 0.0}):
        with pytest.raises(ValueError):
            MatchConfig(**bad)
    from features.core.config import from_dict

    assert from_dict(MatchConfig, {"top_k": [3, 10]}).top_k == (3, 10)
    assert "shards" not in MatchConfig().relevant()
    assert set(M.stable_shard(np.arange(1000), 4)) == {0, 1, 2, 3}
    np.testing.assert_array_equal(M.stable_shard(np.array([5, -3, 2**40]), 7), M.stable_shard(np.array([5, -3, 2**40]), 7))


# --- the job -------------------------------------------------------------------


@pytest.fixture(scope="module")
def synth_emb(synthetic_features, tmp_path_factory):
    return random_embeddings(tmp_path_factory.mktemp("emb") / "emb.parquet", item_ids(synthetic_features))


@pytest.fixture(scope="module")
def synth_full(synthetic_features, synth_emb, tmp_path_factory):
    out = tmp_path_factory.mktemp("match") / "full"
    result = build_match_features(synthetic_features, synth_emb, out, FAST, log=lambda _m: None, progress=False)
    return out, result


def test_job_output_rows_keys_and_manifest(synthetic_features, synth_emb, synth_full):
    out, result = synth_full
    inter = pl.read_parquet(synthetic_features / "interactions.parquet")
    got = pl.read_parquet(out / MATCH_FILE)
    assert result.complete and not result.skipped
    assert_frame_equal(got.select(S.USER_ID, S.ITEM_ID, S.TIMESTAMP), inter.select(S.USER_ID, S.ITEM_ID, S.TIMESTAMP))
    assert got.columns[3:] == FAST.columns()
    assert (got["mf_hist_len"].to_numpy() == np.minimum(inter[S.POS_HIST_END].to_numpy(), FAST.history_cap)).all()
    empty = got["mf_hist_len"] == 0
    for col in FAST.columns()[:-1]:  # explicit nulls, never zeros, exactly where the history is empty
        assert (got[col].is_null() == empty).all(), col
    m = result.manifest
    assert m["stats"]["rows"] == inter.height and m["stats"]["rows_empty_history"] == int(empty.sum())
    assert m["outputs"][MATCH_FILE]["rows"] == inter.height
    assert not (out / "shards").exists()  # merged parts are cleaned up
    again = build_match_features(synthetic_features, synth_emb, out, FAST, log=lambda _m: None, progress=False)
    assert again.skipped
    # a different config is not up to date
    other = dataclasses.replace(FAST, threshold=0.3)
    key_changed = build_match_features(synthetic_features, synth_emb, out / "x", other, log=lambda _m: None, progress=False)
    assert not key_changed.skipped


def test_job_equals_reference_on_real_histories(synthetic_features, synth_emb, synth_full):
    """The job's jagged-column plumbing against the per-pair twin, on a sample of users."""
    out, _ = synth_full
    got = pl.read_parquet(out / MATCH_FILE)
    inter = pl.read_parquet(synthetic_features / "interactions.parquet").filter(pl.col(S.USER_ID) < 12)
    seqs = pl.read_parquet(synthetic_features / "sequences.parquet").filter(pl.col(S.USER_ID) < 12).sort(S.USER_ID)
    emb = pl.read_parquet(synth_emb)
    space = ItemSpace.build(emb["item_id"].to_numpy(), np.array(emb["embedding"].to_list(), np.float32), FAST)
    rows = [space.rows(np.array(x))[0] for x in seqs[S.POS_ITEM_IDS].to_list()]
    hist = Histories.from_lists(rows, [np.array(x) for x in seqs[S.POS_TIMESTAMPS].to_list()])
    user = np.searchsorted(seqs[S.USER_ID].to_numpy(), inter[S.USER_ID].to_numpy())
    ref = reference_match_features(
        space, hist, user, space.rows(inter[S.ITEM_ID].to_numpy())[0], inter[S.POS_HIST_END].to_numpy(),
        inter[S.TIMESTAMP].to_numpy(), FAST,
    )
    expect = M.to_frame(inter, ref, FAST)
    assert_frame_equal(got.filter(pl.col(S.USER_ID) < 12), expect, abs_tol=2e-6)


def test_histories_are_strictly_earlier_positives(synthetic_features):
    """The jagged columns the job reads already exclude ties in time and negatives."""
    inter = pl.read_parquet(synthetic_features / "interactions.parquet")
    seqs = pl.read_parquet(synthetic_features / "sequences.parquet")
    j = inter.join(seqs.select(S.USER_ID, S.POS_TIMESTAMPS), on=S.USER_ID).with_columns(
        pl.col(S.POS_TIMESTAMPS).list.get(pl.col(S.POS_HIST_END) - 1, null_on_oob=True).alias("newest"),
        pl.col(S.POS_TIMESTAMPS).list.get(pl.col(S.POS_HIST_END), null_on_oob=True).alias("next"),
    )
    has = j.filter(pl.col(S.POS_HIST_END) > 0)
    assert (has["newest"] < has[S.TIMESTAMP]).all()
    nxt = j.filter(pl.col("next").is_not_null())
    assert (nxt["next"] >= nxt[S.TIMESTAMP]).all()  # nothing strictly earlier is left out
    tied = inter.filter(pl.len().over(S.USER_ID, S.TIMESTAMP) > 1)
    assert tied.height > 0  # the data has same-second events: they share pos_hist_end
    assert (tied.group_by(S.USER_ID, S.TIMESTAMP).agg(pl.col(S.POS_HIST_END).n_unique())[S.POS_HIST_END] == 1).all()


def test_shards_concatenate_to_the_unsharded_output(synthetic_features, synth_emb, synth_full, tmp_path):
    full, _ = synth_full
    out = tmp_path / "sharded"
    results = [
        build_match_features(synthetic_features, synth_emb, out, FAST, shard=(i, 3), log=lambda _m: None, progress=False)
        for i in range(3)
    ]
    assert [r.complete for r in results] == [False, False, True]  # the last shard merges
    dirs = [match_shard_dir(out, i, 3) for i in range(3)]
    users = [set(pl.read_parquet(d / MATCH_FILE)[S.USER_ID].unique().to_list()) for d in dirs]
    assert not (users[0] & users[1]) and not (users[1] & users[2]) and all(users)
    expect = pl.read_parquet(full / MATCH_FILE)
    assert_frame_equal(concat_match_shards(dirs), expect, check_exact=True)
    assert_frame_equal(pl.read_parquet(out / MATCH_FILE), expect, check_exact=True)
    # shards of another config are never merged, and the message names what is left to run
    other = tmp_path / "mixed"
    logs: list[str] = []
    build_match_features(synthetic_features, synth_emb, other, FAST, shard=(0, 3), log=logs.append, progress=False)
    assert "run 1/3 (not run yet), 2/3 (not run yet)" in logs[-1]
    changed = dataclasses.replace(FAST, faiss_k=21)
    for i in (1, 2):
        logs.clear()
        r = build_match_features(synthetic_features, synth_emb, other, changed, shard=(i, 3), log=logs.append,
                                 progress=False)
    assert not r.complete and not (other / MATCH_FILE).exists()
    assert "run 0/3 (built from other inputs or config)" in logs[-1] and "--shard i/3" in logs[-1]
    assert parse_shard("2/3") == (2, 3)
    for bad in ("3/3", "x", "1/0"):
        with pytest.raises(UsageError):
            parse_shard(bad)


def test_resume_after_a_failure_skips_finished_shards(synthetic_features, synth_emb, synth_full, tmp_path, monkeypatch):
    full, _ = synth_full
    out = tmp_path / "resume"
    real = M.compute_match_features
    calls = []

    def dies_after_first(*a, **kw):
        if calls:
            raise RuntimeError("killed")
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(M, "compute_match_features", dies_after_first)
    with pytest.raises(RuntimeError, match="killed"):
        build_match_features(synthetic_features, synth_emb, out, FAST, log=lambda _m: None, progress=False)
    assert (match_shard_dir(out, 0, 3) / "manifest.json").is_file()
    assert not (out / MATCH_FILE).exists() and not (out / "manifest.json").exists()
    assert not match_shard_dir(out, 1, 3).exists()  # the failed shard left nothing under its name
    monkeypatch.setattr(M, "compute_match_features", real)
    logs = []
    result = build_match_features(synthetic_features, synth_emb, out, FAST, log=logs.append, progress=False)
    assert result.shards_computed == [1, 2] and result.complete
    assert any("resuming" in m for m in logs)
    assert_frame_equal(pl.read_parquet(out / MATCH_FILE), pl.read_parquet(full / MATCH_FILE), check_exact=True)


# --- bad embeddings -------------------------------------------------------------


@pytest.mark.parametrize(
    "case,message",
    [
        ("missing", "have no vector"),
        ("ragged", "ragged"),
        ("dim", "dimension 16, expected 8"),
        ("nan", "NaN"),
        ("inf", "NaN, inf"),
        ("duplicate", "duplicate item ids"),
        ("zero", "all-zero"),
    ],
)
def test_bad_embeddings_fail_clearly_without_output(synthetic_features, tmp_path, case, message):
    ids = item_ids(synthetic_features)
    vec = np.random.default_rng(1).standard_normal((len(ids), 16)).astype(np.float32)
    rows = vec.tolist()
    cfg = FAST
    bad_ids = [int(ids[3]), int(ids[7])]
    if case == "missing":
        ids, rows = ids[8:], rows[8:]
        bad_ids = ids_missing = [int(i) for i in item_ids(synthetic_features)[:8]]
        used = set(pl.read_parquet(synthetic_features / "interactions.parquet")[S.ITEM_ID].to_list())
        bad_ids = [i for i in ids_missing if i in used][:2]
    elif case == "ragged":
        rows[3], rows[7] = rows[3][:5], rows[7] + [0.5]
    elif case == "dim":
        cfg = dataclasses.replace(FAST, dim=8)
        bad_ids = []
    elif case in ("nan", "inf"):
        rows[3][0] = rows[7][2] = float("nan") if case == "nan" else float("inf")
    elif case == "duplicate":
        ids = np.concatenate([ids, ids[[3, 7]]])
        rows = rows + [rows[3], rows[7]]
    elif case == "zero":
        rows[3] = rows[7] = [0.0] * 16
    path = write_embeddings(tmp_path / "bad.parquet", ids, rows)
    out = tmp_path / "out"
    with pytest.raises(DataError, match=message) as err:
        build_match_features(synthetic_features, path, out, cfg, log=lambda _m: None, progress=False)
    text = str(err.value)
    assert str(path) in text and ("item_id" in text or "embedding" in text)
    for i in bad_ids:
        assert str(i) in text
    assert err.value.exit_code == 1
    assert not out.exists() or not any(out.rglob("*.parquet"))


def test_schema_errors_name_the_column(tmp_path):
    with pytest.raises(SchemaError, match="embedding"):
        M.validate_embeddings(pl.DataFrame({"item_id": [1]}), "f.parquet")
    with pytest.raises(SchemaError, match="List"):
        M.validate_embeddings(pl.DataFrame({"item_id": [1], "embedding": ["x"]}), "f.parquet")
    arrays = pl.DataFrame(
        {"item_id": [2, 1], "embedding": [[1.0, 2.0], [3.0, 4.0]]},
        schema={"item_id": pl.Int64, "embedding": pl.Array(pl.Float64, 2)},
    )
    ids, vec = M.validate_embeddings(arrays, "f.parquet")
    assert ids.tolist() == [2, 1] and vec.dtype == np.float32 and vec.shape == (2, 2)


def test_missing_items_null_policy_gives_null_rows_and_counts_them(synthetic_features, tmp_path):
    ids = item_ids(synthetic_features)
    inter = pl.read_parquet(synthetic_features / "interactions.parquet")
    drop = set(inter[S.ITEM_ID].value_counts(sort=True)[S.ITEM_ID].head(5).to_list())  # popular: in histories too
    keep = np.array([i not in drop for i in ids])
    path = random_embeddings(tmp_path / "partial.parquet", ids[keep])
    cfg = dataclasses.replace(FAST, missing_items="null")
    result = build_match_features(synthetic_features, path, tmp_path / "out", cfg, log=lambda _m: None, progress=False)
    got = pl.read_parquet(tmp_path / "out" / MATCH_FILE)
    missing = got[S.ITEM_ID].is_in(list(drop))
    assert got.filter(missing)["mf_cos_max"].null_count() == int(missing.sum())
    stats = result.manifest["stats"]
    assert stats["rows_missing_candidate"] == int(missing.sum()) and stats["items_missing"] == 5
    assert stats["history_events_dropped"] > 0
    # dropped history items shorten the windows
    assert (got["mf_hist_len"] <= np.minimum(inter[S.POS_HIST_END].to_numpy(), cfg.history_cap)).all()
    assert (got["mf_hist_len"].to_numpy() < inter[S.POS_HIST_END].to_numpy()).any()


def test_vectors_of_items_outside_the_features_folder_are_left_out_with_a_warning(
        synthetic_features, synth_emb, synth_full, tmp_path, capsys):
    # a larger catalogue's file: its extra vectors would join the faiss index and the semantic-ID k-means
    ids = item_ids(synthetic_features)
    emb = pl.read_parquet(synth_emb)
    extra = pl.DataFrame({"item_id": pl.Series([-1, 10_000_000], dtype=pl.Int64),
                          "embedding": pl.Series([[1.0] * 16, [0.5] * 16], dtype=pl.List(pl.Float32))})
    path = tmp_path / "bigger.parquet"
    pl.concat([extra, emb]).write_parquet(path)
    logs: list[str] = []
    build_match_features(synthetic_features, path, tmp_path / "out", FAST, log=logs.append, progress=False)
    assert any("2 vectors of item ids not in" in m and "(ids -1, 10000000)" in m for m in logs), logs
    assert_frame_equal(pl.read_parquet(tmp_path / "out" / MATCH_FILE), pl.read_parquet(synth_full[0] / MATCH_FILE))
    assert len(ids) == emb.height  # the fixture's file holds exactly the folder's items
    # --quiet drops the progress and the summary, not the warning (it dropped both before 2026-12-01)
    from recsys.cli import main

    cfg = tmp_path / "fast.yaml"
    cfg.write_text("match: {faiss_k: 20, sid_codebook_size: 8, sid_niter: 5, shards: 3}\n")
    assert main(["features", "match", "--features", str(synthetic_features), "--embeddings", str(path),
                 "--out", str(tmp_path / "quiet"), "--config", str(cfg), "--quiet"]) == 0
    said = capsys.readouterr()
    assert "2 vectors of item ids not in" in said.err and "match:" not in said.out.replace("output:", ""), said
    none = tmp_path / "none.parquet"
    extra.write_parquet(none)
    with pytest.raises(DataError, match="no vector is of an item of"):
        build_match_features(synthetic_features, none, tmp_path / "out2", dataclasses.replace(FAST, missing_items="null"),
                             log=lambda _m: None, progress=False)
    assert not (tmp_path / "out2").exists()


# --- CLI ------------------------------------------------------------------------


@pytest.fixture
def cli_main(monkeypatch):
    """`recsys.cli.main` with a `features` group that holds the match command
    (the lead wires it into recsys.cli.features)."""
    import recsys.cli as cli
    from recsys.cli import match as match_cli

    mod = types.ModuleType("_features_with_match")

    def register(sub):
        _, fsub = cli.group(sub, "features", "feature jobs")
        match_cli.register(fsub)

    mod.register = register
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    monkeypatch.setattr(cli, "COMMAND_MODULES", (mod.__name__,))
    return cli.main


def test_cli_contract_on_ml100k(ml100k_features, cli_main, tmp_path, capsys):
    emb = random_embeddings(tmp_path / "emb.parquet", item_ids(ml100k_features), dim=8)
    cfg = tmp_path / "pipeline.yaml"
    cfg.write_text("match:\n  faiss_k: 20\n  sid_codebook_size: 8\n  sid_niter: 4\n  shards: 2\n")
    out = tmp_path / "match"
    argv = ["features", "match", "--features", str(ml100k_features), "--embeddings", str(emb), "--out", str(out)]
    assert cli_main([*argv, "--config", str(cfg), "--quiet"]) == 0
    inter = pl.read_parquet(ml100k_features / "interactions.parquet", columns=[S.USER_ID, S.ITEM_ID, S.TIMESTAMP])
    got = pl.read_parquet(out / MATCH_FILE)
    assert got.height == inter.height == 100_000
    assert_frame_equal(got.select(inter.columns), inter)
    assert all(c.startswith("mf_") for c in got.columns[3:]) and "mf_faiss_rank" in got.columns
    assert got["mf_faiss_rank"].max() <= 21
    # bad input: exit 1 with the file named; bad usage: exit 2
    bad = write_embeddings(tmp_path / "bad.parquet", item_ids(ml100k_features)[5:], np.ones((1677, 8)).tolist())
    bad_argv = ["features", "match", "--features", str(ml100k_features), "--embeddings", str(bad), "--out", str(tmp_path / "b")]
    assert cli_main(bad_argv) == 1
    assert "bad.parquet" in capsys.readouterr().err
    assert cli_main([*argv, "--shard", "5/2"]) == 2
    cfg.write_text("match:\n  thresold: 0.3\n")
    assert cli_main([*argv, "--config", str(cfg)]) == 2
    assert "did you mean 'threshold'" in capsys.readouterr().err


def test_cli_help_has_examples(cli_main, capsys):
    with pytest.raises(SystemExit):
        cli_main(["features", "match", "--help"])
    text = capsys.readouterr().out
    assert "examples:" in text and "--shard" in text and "--embeddings" in text


def test_thread_count_never_changes_the_output(monkeypatch):
    cfg, space, hist, user, cand, end, _ = random_case(6, users=16)
    monkeypatch.setattr(K, "BATCH_SIMS", 5000)  # many small batches: the threads really share the users
    seen = []
    import threading

    real = K._user_features
    monkeypatch.setattr(K, "_user_features", lambda *a: seen.append(threading.get_ident()) or real(*a))
    one = compute_match_features(space, hist, user, cand, end, dataclasses.replace(cfg, workers=1))
    many = compute_match_features(space, hist, user, cand, end, dataclasses.replace(cfg, workers=3))
    for col in [*cfg.columns(), "valid"]:
        np.testing.assert_array_equal(one[col], many[col], err_msg=col)
    assert len(set(seen)) > 2  # the main thread, then several workers


@pytest.mark.parametrize("width", [96, 200 * 32, 640 * 32])  # plain sort, strided groups, blocks then groups
@pytest.mark.parametrize("threshold", [0.05, 0.9])  # dense and sparse counts
def test_tile_top_k_and_count_are_exact(width, threshold):
    """The block-max selection against a full sort, with padding, short windows and tied values."""
    rng = np.random.default_rng(width)
    sim = (rng.standard_normal((40, width)) / 3).astype(np.float32)
    sim[:, -7:] = -np.inf  # padding
    sim[3, 10:] = -np.inf  # a row with fewer values than k
    sim[5, ::2] = sim[5, 1::2] = 0.7  # many ties
    top, count = K._top_and_count(sim.copy(), 20, threshold)
    expect = -np.sort(-sim, axis=1)[:, :20]
    np.testing.assert_array_equal(top, expect)
    np.testing.assert_array_equal(count, (sim > threshold).sum(axis=1))


def test_outputs_edited_after_their_job_are_refused_downstream(synthetic_features, synth_emb, synth_full, tmp_path):
    """Found by a probe (2026-11-30), each exit 0 before: a features folder
    whose interactions.parquet was rewritten gave match features of the new
    rows (and a rerun on it skipped); LightGBM trained on match features of
    another features build, and on a match file with a column overwritten."""
    import shutil

    from recsys.baseline import load_table

    feats = tmp_path / "feats"
    shutil.copytree(synthetic_features, feats)
    inter = pl.read_parquet(feats / "interactions.parquet")
    inter.with_columns(pl.col(S.POS_HIST_END) // 2).write_parquet(feats / "interactions.parquet")
    with pytest.raises(DataError, match="changed since `features.build` wrote it"):
        build_match_features(feats, synth_emb, tmp_path / "m", FAST, log=lambda _m: None, progress=False)
    assert not (tmp_path / "m").exists()  # refused before any shard
    out, _ = synth_full
    with pytest.raises(DataError, match="changed since `features.build`"):  # the rerun that used to skip
        build_match_features(feats, synth_emb, out, FAST, log=lambda _m: None, progress=False)

    # match features of another build of the same events (another label threshold): same keys, other histories
    from features.jobs import FeaturesConfig, build_features
    from features.sources import SyntheticConfig

    other = tmp_path / "other"
    build_features(FeaturesConfig(source="synthetic", label_threshold=2.0,
                                  synthetic=SyntheticConfig(users=300, items=400, max_events=120, seed=3)), other, log=lambda _m: None)
    assert pl.read_parquet(other / "interactions.parquet").select(S.MATCH_KEYS).equals(inter.select(S.MATCH_KEYS))
    with pytest.raises(DataError, match="built from other features than"):
        load_table(other, out)
    load_table(synthetic_features, out)  # the folder it was built from is fine

    edited = tmp_path / "edited"
    shutil.copytree(out, edited)
    mf = pl.read_parquet(edited / MATCH_FILE)
    mf.with_columns(pl.lit(float("nan")).alias("mf_cos_max")).write_parquet(edited / MATCH_FILE)
    with pytest.raises(DataError, match="changed since `features.match` wrote it"):
        load_table(synthetic_features, edited)


def test_unreadable_or_oversized_embedding_ids_name_the_file(synthetic_features, tmp_path):
    """Both reached the 'unexpected' handler, without the file, before 2026-11-30."""
    ids = item_ids(synthetic_features)
    as_csv = tmp_path / "emb.parquet"
    as_csv.write_text("item_id,embedding\n1,0.5\n")
    with pytest.raises(DataError, match="not a readable parquet file") as e:
        build_match_features(synthetic_features, as_csv, tmp_path / "a", FAST, log=lambda _m: None, progress=False)
    assert "emb.parquet" in str(e.value)
    big = tmp_path / "big.parquet"
    vec = np.random.default_rng(0).standard_normal((len(ids), 4)).astype(np.float32)
    pl.DataFrame({"item_id": pl.Series([*ids[:-1].tolist(), 2**63 + 5], dtype=pl.UInt64),
                  "embedding": pl.Series(list(vec), dtype=pl.List(pl.Float32))}).write_parquet(big)
    with pytest.raises(DataError, match=f"row {len(ids)}: 1 item ids larger than the largest Int64 id"):
        build_match_features(synthetic_features, big, tmp_path / "b", FAST, log=lambda _m: None, progress=False)


def test_an_input_replaced_while_the_job_reads_it_is_refused(synthetic_features, synth_emb, tmp_path, monkeypatch):
    """A probe (2026-12-01): interactions.parquet swapped during a run gave
    exit 0, features of the swapped file under a key of the original bytes,
    and every rerun reused them."""
    import shutil

    import features.jobs.match as J

    feats = tmp_path / "features"
    shutil.copytree(synthetic_features, feats)
    real, calls = J._match_part, []

    def part_then_swap(*args, **kwargs):
        calls.append(1)
        result = real(*args, **kwargs)
        if len(calls) == 1:  # another process rewrites the file after the first shard read it
            inter = pl.read_parquet(feats / S.FILES["interactions"])
            inter.with_columns(pl.col(S.ITEM_ID).shuffle(seed=1)).write_parquet(feats / S.FILES["interactions"])
        return result

    monkeypatch.setattr(J, "_match_part", part_then_swap)
    with pytest.raises(DataError, match="changed while this job read it"):
        build_match_features(feats, synth_emb, tmp_path / "out", FAST, log=lambda _m: None, progress=False)
    assert not (tmp_path / "out" / MATCH_FILE).exists() and not list((tmp_path / "out").glob("shards/*/" + MATCH_FILE))


def test_an_input_that_breaks_during_the_run_is_named(synthetic_features, synth_emb, tmp_path, monkeypatch):
    """A probe (2026-12-01): a swap mid-read surfaced as "unexpected
    ComputeError: ... page size", naming no file."""
    import shutil

    import features.jobs.match as J

    feats = tmp_path / "features"
    shutil.copytree(synthetic_features, feats)
    real_scan = pl.scan_parquet

    def scan_broken(path, *a, **k):
        if str(path).endswith(S.FILES["interactions"]):
            (tmp_path / "junk.parquet").write_bytes(b"PAR1 not really")
            return real_scan(tmp_path / "junk.parquet", *a, **k)
        return real_scan(path, *a, **k)

    monkeypatch.setattr(J.pl, "scan_parquet", scan_broken)
    with pytest.raises(DataError, match="replaced or rewritten during the run") as e:
        J._match_part(feats, np.array([1, 2], dtype=np.int64), None, FAST, lambda _n: None)
    assert S.FILES["interactions"] in str(e.value)
