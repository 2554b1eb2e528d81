"""Faults of `teachers fit`, `distill train` and `distill eval`, and the full
chain (features -> distill -> match -> rank -> experiment run/compare) on a
20-user files dataset.

Each case asserts the exit code, the message (file / column where they
apply) and what is left under the final output name.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import yaml

from tests.faults.conftest import snapshot, write_tiny_dataset

# tiny models, few epochs; batch sizes stay at their defaults (512 / 1024),
# far above the ~240 events of the dataset
TINY = {
    "seed": 0,
    "tracking": {"enabled": False},
    "teachers": {"id2item": {"epochs": 2, "dim": 8}, "seq2item": {"epochs": 2, "dim": 8}},
    "distill": {
        "student": {"dim": 16, "hidden_dim": 16, "field_dim": 8},
        "matryoshka_dims": [8],
        "epochs": 2,
        "ablations": False,
        "progress": False,
    },
}


def _merge(base: dict, delta: dict) -> dict:
    out = dict(base)
    for k, v in delta.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _config(folder: Path, **sections) -> Path:
    path = Path(folder) / "tiny.yaml"
    path.write_text(yaml.safe_dump(_merge(TINY, sections)))
    return path


def _quiet_main(*argv) -> int:
    from recsys.cli import main

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
        rc = main([str(a) for a in argv])
    assert rc == 0, err.getvalue()
    return rc


def _build(folder: Path, ds) -> Path:
    out = Path(folder) / "features"
    _quiet_main("features", "build", "--source", "files", "--interactions", ds.interactions, "--items", ds.items, "--out", out, "--quiet")
    return out


def _no_nan(obj) -> bool:
    if isinstance(obj, float):
        return math.isfinite(obj)
    if isinstance(obj, dict):
        return all(_no_nan(v) for v in obj.values())
    if isinstance(obj, list):
        return all(_no_nan(v) for v in obj)
    return True


@pytest.fixture(scope="module")
def encoder_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("encoders")


@pytest.fixture(autouse=True)
def _env(encoder_cache, monkeypatch):
    """One text-encoder cache for the module (MiniLM encodes the 30 titles
    once), one torch thread (2 shared cores)."""
    import torch

    monkeypatch.setenv("RECSYS_CACHE_DIR", str(encoder_cache))
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    """Features of the ordinary 20-user dataset, shared read-only."""
    root = tmp_path_factory.mktemp("tiny")
    return _build(root, write_tiny_dataset(root / "data"))


def _features_with(tmp_path: Path, edit_items=None, edit_interactions=None, **kw) -> Path:
    """Features of a tiny dataset (write_tiny_dataset `kw`) whose raw files were edited first."""
    ds = write_tiny_dataset(tmp_path / "data", **kw)
    if edit_items is not None:
        edit_items(pl.read_parquet(ds.items)).write_parquet(ds.items)
    if edit_interactions is not None:
        edit_interactions(pl.read_parquet(ds.interactions)).write_parquet(ds.interactions)
    return _build(tmp_path, ds)


# --- item text -------------------------------------------------------------------


def _blank_text(share: float, value):
    def edit(df: pl.DataFrame) -> pl.DataFrame:
        n = int(round(share * df.height))
        return df.with_columns(pl.when(pl.int_range(pl.len()) < n).then(pl.lit(value, pl.String)).otherwise(pl.col("text")).alias("text"))

    return edit


@pytest.mark.parametrize(
    "share, value, counts, why",
    [
        # a probe (2026-12-01): "100% ... more than max_empty_text_share 1 allows ... or raise it" at share 1.0
        (1.0, "", "30 of 30 items (100%) have no text (0 null, 30 blank)", "every item's text is empty"),
        (0.6, None, "18 of 30 items (60%) have no text (18 null, 0 blank)", "max_empty_text_share 0.5"),
    ],
    ids=["all-blank", "60%-null"],
)
def test_mostly_empty_text_is_refused(cli, tmp_path, share, value, counts, why):
    feats = _features_with(tmp_path, edit_items=_blank_text(share, value))
    out = tmp_path / "distill"
    cfg = _config(tmp_path, distill={"max_empty_text_share": 1.0} if share == 1.0 else {})
    rc, _, err = cli("distill", "train", "--features", feats, "--out", out, "--config", cfg)
    assert rc == 1
    assert f"file {feats / 'items.parquet'}, column 'text'" in err and counts in err
    assert why in err and ("raise distill.max_empty_text_share" in err) == (share < 1)
    assert not (out / "item_embeddings.parquet").exists() and not (out / "teachers").exists()


def test_some_empty_text_warns_with_counts(cli, tmp_path):
    feats = _features_with(tmp_path, edit_items=_blank_text(0.3, None))
    out = tmp_path / "distill"
    rc, _, err = cli("distill", "train", "--features", feats, "--out", out, "--config", _config(tmp_path))
    assert rc == 0, err
    assert "warning:" in err and "9 of 30 items (30%) have no text (9 null, 0 blank)" in err
    assert pl.read_parquet(out / "item_embeddings.parquet").height == 30


def test_max_empty_text_share_is_configurable(cli, tmp_path):
    feats = _features_with(tmp_path, edit_items=_blank_text(0.6, ""))
    cfg = _config(tmp_path, distill={"max_empty_text_share": 0.7})
    rc, _, err = cli("distill", "train", "--features", feats, "--out", tmp_path / "distill", "--config", cfg)
    assert rc == 0, err
    assert "18 of 30 items (60%) have no text" in err


@pytest.mark.parametrize("value", [1.5, -0.1])
def test_max_empty_text_share_out_of_range(cli, tmp_path, features, value):
    cfg = _config(tmp_path, distill={"max_empty_text_share": value})
    rc, _, err = cli("distill", "train", "--features", features, "--out", tmp_path / "distill", "--config", cfg)
    assert rc == 2
    assert "max_empty_text_share" in err and "[0, 1]" in err
    assert not (tmp_path / "distill").exists()


# --- output guards -------------------------------------------------------------------


@pytest.mark.parametrize(
    "command, where, words",
    [
        (("teachers", "fit"), lambda f: f, "same path as input --features"),
        (("distill", "train"), lambda f: f / "distill", "lies inside input --features"),
        (("distill", "eval"), lambda f: f.parent, "contains input --features"),
    ],
    ids=["teachers-fit-equal", "distill-train-inside", "distill-eval-contains"],
)
def test_out_overlapping_features_is_refused(cli, tmp_path, command, where, words):
    feats = _features_with(tmp_path)
    cfg = _config(tmp_path / "data")
    before = snapshot(tmp_path)
    rc, _, err = cli(*command, "--features", feats, "--out", where(feats), "--config", cfg)
    assert rc == 2
    assert words in err
    assert snapshot(tmp_path) == before  # nothing written, nothing removed


def test_out_symlink_to_features_is_refused(cli, tmp_path, features):
    link = tmp_path / "link"
    link.symlink_to(features, target_is_directory=True)
    before = snapshot(features)
    rc, _, err = cli("distill", "eval", "--features", features, "--out", link, "--config", _config(tmp_path))
    assert rc == 2 and "same path as input --features" in err
    assert snapshot(features) == before


def test_out_equal_to_config_is_refused(cli, tmp_path, features):
    cfg = _config(tmp_path)
    text = cfg.read_text()
    rc, _, err = cli("teachers", "fit", "--features", features, "--out", cfg, "--config", cfg)
    assert rc == 2 and "same path as input --config" in err
    assert cfg.read_text() == text


def test_out_existing_file_is_refused_before_any_work(cli, tmp_path, features):
    out = tmp_path / "out.txt"
    out.write_text("keep me")
    rc, _, err = cli("distill", "train", "--features", features, "--out", out, "--config", _config(tmp_path))
    assert rc == 2 and "is an existing file" in err
    assert out.read_text() == "keep me"
    assert {p.name for p in tmp_path.iterdir()} == {"out.txt", "tiny.yaml"}


def test_unusable_encoder_cache_is_a_usage_error(cli, tmp_path, features, monkeypatch):
    blocker = tmp_path / "cache_is_a_file"
    blocker.write_text("")
    monkeypatch.setenv("RECSYS_CACHE_DIR", str(blocker))
    rc, _, err = cli("distill", "train", "--features", features, "--out", tmp_path / "distill", "--config", _config(tmp_path))
    assert rc == 2 and "encoder cache" in err and str(blocker) in err
    assert not (tmp_path / "distill").exists()


# --- tiny data ---------------------------------------------------------------------


def test_teachers_fit_on_tiny_data(cli, tmp_path, features):
    out = tmp_path / "teachers"
    rc, _, err = cli("teachers", "fit", "--features", features, "--out", out, "--config", _config(tmp_path))
    assert rc == 0, err
    for name in ("id2item.parquet", "seq2item.parquet"):
        emb = np.asarray(pl.read_parquet(out / name)["embedding"].to_list())
        assert emb.shape == (30, 8) and np.isfinite(emb).all()


def test_distill_train_on_tiny_data_with_batches_larger_than_the_data(cli, tmp_path, features):
    out = tmp_path / "distill"
    rc, outp, err = cli("distill", "train", "--features", features, "--out", out, "--config", _config(tmp_path))
    assert rc == 0, err
    assert outp.strip().endswith(str(out / "item_embeddings.parquet"))
    emb = pl.read_parquet(out / "item_embeddings.parquet")
    assert emb["item_id"].to_list() == list(range(1, 31))
    vec = np.asarray(emb["embedding"].to_list())
    np.testing.assert_allclose(np.linalg.norm(vec, axis=1), 1, atol=1e-5)


def test_i2i_pairs_per_step_never_exceed_the_pairs_there_are(monkeypatch, features):
    """batch_size far above the data: L_i2i draws at most as many pairs per
    step as exist (a (P, P) logit matrix of batch_size/2 repeats would only
    cost memory: batch_size 100,000 drew 50,000 pairs, an OOM kill)."""
    import distill.train as T
    from distill.evaluate import prepare_cold_start
    from distill.student import ContentSpec, ContentTensors, StudentConfig
    from distill.encoders import build_content

    items = pl.read_parquet(features / "items.parquet")
    data = prepare_cold_start(pl.read_parquet(features / "interactions.parquet"), pl.read_parquet(features / "sequences.parquet"), items)
    content = build_content(items, use_text=False, progress=False)
    cfg = T.DistillConfig(
        student=StudentConfig(dim=8, hidden_dim=8, use_text=False),
        matryoshka_dims=(4,), use_id2i=False, epochs=1, batch_size=2_000, progress=False,
    )  # fmt: skip
    x = ContentTensors.from_features(content, cfg.student)
    n_pairs = len(T.i2i_pairs(data.train_sequences, cfg.i2i_window))
    seen = []
    real = T.make_batch
    monkeypatch.setattr(T, "make_batch", lambda h, t, p, fallback=None: seen.append(len(p)) or real(h, t, p, fallback))
    T.fit_student(x, ContentSpec.of(x, content.fields.vocab_size), data, {}, cfg)
    assert seen and 0 < max(seen) <= n_pairs < 1_000


def test_eval_without_cold_items_gives_null_with_reasons(cli, tmp_path, features):
    out = tmp_path / "eval"
    big = {"eval_ks": [5, 1000], "select_k": 1000, "diag_k": 100, "diag_clusters": 100}  # all above the 30 items
    cfg = _config(tmp_path, distill={"holdout_frac": 0.0, **big})
    rc, outp, err = cli("distill", "eval", "--features", features, "--out", out, "--config", cfg)
    assert rc == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    assert _no_nan(metrics)
    reasons = metrics["reasons"]
    assert metrics["recall@5_cold_student"] is None and reasons["recall@5_cold_student"].startswith("no cold target among the")
    assert set(reasons) == {k for k, v in metrics.items() if v is None}
    # k above the 30 items: every target is retrieved, never more than all of them
    assert metrics["recall@1000_warm_student"] == 1.0 and 0 <= metrics["recall@5_warm_student"] <= 1
    assert metrics["topk_overlap_chance_vs_id_teacher"] == 1.0  # top-100 of 30 items: every other item
    assert "n/a" in outp and "no cold target among the" in outp
    # --seed runs said nothing but the table before 2026-12-01 (warnings included): now the progress, one table
    assert "student: trained" in outp and "distill eval: wrote" in outp and outp.count("cold@5") == 1, outp


def test_eval_without_test_positives_gives_null_with_reasons(cli, tmp_path):
    def last_week_negative(df: pl.DataFrame) -> pl.DataFrame:
        cut = df["timestamp"].quantile(0.75)
        return df.with_columns(pl.when(pl.col("timestamp") > cut).then(1.0).otherwise(pl.col("rating")).alias("rating"))

    feats = _features_with(tmp_path, edit_interactions=last_week_negative)
    out = tmp_path / "eval"
    rc, outp, err = cli("distill", "eval", "--features", feats, "--out", out, "--config", _config(tmp_path))
    assert rc == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    assert _no_nan(metrics)
    test_recalls = [k for k in metrics if k.startswith("recall@")]
    assert test_recalls and all(metrics[k] is None for k in test_recalls)
    assert metrics["reasons"]["recall@10_warm_student"].startswith("no test impressions")


def test_holdout_that_leaves_no_items_is_a_data_error(cli, tmp_path, features):
    out = tmp_path / "eval"
    cfg = _config(tmp_path, distill={"holdout_frac": 0.99, "pseudo_cold_frac": 0.0})
    rc, _, err = cli("distill", "eval", "--features", features, "--out", out, "--config", cfg)
    assert rc == 1
    assert "column 'label'" in err and "no train positives left after holding out items" in err
    assert not out.exists()


def test_held_out_shares_that_cover_every_item_are_a_config_error(cli, tmp_path, features):
    out = tmp_path / "eval"
    cfg = _config(tmp_path, distill={"holdout_frac": 0.6, "pseudo_cold_frac": 0.4})
    rc, _, err = cli("distill", "eval", "--features", features, "--out", out, "--config", cfg)
    assert rc == 2
    assert "pseudo_cold_frac" in err
    assert not out.exists()


def test_too_few_positives_for_the_sequence_teacher_is_a_data_error(cli, tmp_path):
    feats = _features_with(tmp_path, users=5, items=4, events_per_user=4)
    out = tmp_path / "teachers"
    # 3 of the 4 items held out (2 test-cold, 1 pseudo-cold): one item is left, so no user has 2 train positives
    rc, _, err = cli("teachers", "fit", "--features", feats, "--out", out, "--config", _config(tmp_path, distill={"holdout_frac": 0.5, "pseudo_cold_frac": 0.25}))
    assert rc == 1
    assert f"file {feats / 'interactions.parquet'}, column 'label'" in err and "no user has 2 or more train positives" in err
    assert not out.exists()


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the 1e30 steps before the NaN
@pytest.mark.parametrize(
    "section, hint",
    [({"distill": {"lr": 1e30}}, "distill student"), ({"teachers": {"id2item": {"lr": 1e30}}}, "id2item teacher")],
    ids=["student", "id2item"],
)
def test_diverged_training_stops_naming_epoch_and_step(cli, tmp_path, features, section, hint):
    out = tmp_path / "distill"
    rc, _, err = cli("distill", "train", "--features", features, "--out", out, "--config", _config(tmp_path, **section))
    assert rc == 1
    assert f"{hint}: the loss became nan at epoch" in err and ", step " in err and "lower " in err
    assert not (out / "item_embeddings.parquet").exists() and not (out / "manifest.json").exists()


def test_a_corrupt_or_replaced_teachers_checkpoint_is_refitted(cli, tmp_path, features):
    """teachers.pt is fingerprinted in its manifest: a corrupt one, or
    another run's copied in (a probe, 2026-12-01: the student then trained
    against the wrong teachers, exit 0), is not reused but refitted."""
    out = tmp_path / "distill"
    cfg = _config(tmp_path)
    assert cli("teachers", "fit", "--features", features, "--out", out / "teachers", "--config", cfg).rc == 0
    own = (out / "teachers" / "teachers.pt").read_bytes()
    (out / "teachers" / "teachers.pt").write_bytes(b"not a checkpoint")
    rc, _, err = cli("distill", "train", "--features", features, "--out", out, "--config", cfg)
    assert rc == 0, err
    assert (out / "teachers" / "teachers.pt").read_bytes() == own  # refitted: the same teachers again
    assert (out / "item_embeddings.parquet").is_file()


@pytest.mark.parametrize("command", ["train", "eval"])
def test_a_deleted_or_replaced_student_checkpoint_reruns_the_stage(cli, tmp_path, features, command):
    """A probe (2026-12-01): `distill eval` was "up to date" with another
    run's student/student.pt copied in (and registered it as recsys-student),
    and a deleted one was never rebuilt: only the top-level manifest was checked."""
    out = tmp_path / "distill"
    argv = ("distill", command, "--features", features, "--out", out, "--config", _config(tmp_path),
            *(("--no-ablations",) if command == "eval" else ()))
    assert cli(*argv).rc == 0
    student = out / "student" / "student.pt"
    own, reused = student.read_bytes(), f"distill {command}: {out} is up to date"
    student.write_bytes(b"another run's student")
    rc, said, err = cli(*argv)
    assert rc == 0 and reused not in said + err and "student: trained" in said + err and student.read_bytes() == own
    student.unlink()
    rc, said, err = cli(*argv)
    assert rc == 0 and reused not in said + err and student.read_bytes() == own
    rc, said, err = cli(*argv)
    assert rc == 0 and reused in said + err
    # another run's whole folders, self-consistent manifests included (a probe of the fix): not this run's
    import shutil

    other = tmp_path / "other"
    (tmp_path / "other_cfg").mkdir()
    assert cli("distill", "train", "--features", features, "--out", other, "--config",
               _config(tmp_path / "other_cfg", seed=1)).rc == 0
    for sub in ("teachers", "student"):
        shutil.rmtree(out / sub)
        shutil.copytree(other / sub, out / sub)
    rc, said, err = cli(*argv)
    assert rc == 0 and reused not in said + err and student.read_bytes() == own


def test_killed_run_is_cleaned_and_rerun_gives_identical_output(cli, tmp_path, features):
    cfg = _config(tmp_path)
    clean = tmp_path / "clean"
    assert cli("distill", "train", "--features", features, "--out", clean, "--config", cfg).rc == 0
    # what a SIGKILL mid-way leaves: the teachers finished, the student's temp
    # folder (of a process that is gone) half written, no final output
    out = tmp_path / "killed"
    assert cli("teachers", "fit", "--features", features, "--out", out / "teachers", "--config", cfg).rc == 0
    stale = out / ".student.tmp-999999999-deadbeef"
    stale.mkdir()
    (stale / "item_embeddings.parquet").write_bytes(b"half")
    rc, _, err = cli("distill", "train", "--features", features, "--out", out, "--config", cfg)
    assert rc == 0, err
    assert not stale.exists()
    assert snapshot(out / "student")["item_embeddings.parquet"] == snapshot(clean / "student")["item_embeddings.parquet"]
    assert snapshot(out)["item_embeddings.parquet"] == snapshot(clean)["item_embeddings.parquet"]


# --- the full chain ---------------------------------------------------------------


@pytest.mark.slow
def test_full_chain_on_a_20_user_files_dataset(cli, tmp_path):
    """features build -> distill train -> features match -> rank train ->
    experiment run (control vs match features) -> experiment compare."""
    ds = write_tiny_dataset(tmp_path / "data")
    store = f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"
    feats, dist, match, rank = (tmp_path / n for n in ("features", "distill", "match", "rank"))
    base = _merge(
        TINY,
        {
            "name": "tiny-chain",
            "tracking": {"enabled": True, "uri": store},
            "features": {"source": "files", "interactions": str(ds.interactions), "items": str(ds.items)},
            "match": {"faiss_k": 10, "sid_codebook_size": 4, "shards": 1},
            "ranker": {"embedding_dim": 8, "svd_rank": 4},
            "data": {"history_cap": 50, "use_match_features": True},
            "train": {"epochs": 1, "progress": False},
            "lightgbm": {"n_estimators": 10},
            "paths": {"root": str(tmp_path / "pipeline"), "features": str(feats), "match_features": str(match)},
        },
    )
    cfg = tmp_path / "chain.yaml"
    cfg.write_text(yaml.safe_dump(base))

    def ok(*argv):
        rc, out, err = cli(*argv)
        assert rc == 0, f"{' '.join(map(str, argv[:2]))}: exit {rc}\n{err[-3000:]}"
        return out

    ok("features", "build", "--config", cfg, "--out", feats, "--quiet")
    ok("distill", "train", "--features", feats, "--out", dist, "--config", cfg)
    emb = dist / "item_embeddings.parquet"
    ok("features", "match", "--features", feats, "--embeddings", emb, "--out", match, "--config", cfg, "--quiet")
    ok("rank", "train", "--config", cfg, "--out", rank)
    metrics = json.loads((rank / "metrics.json").read_text())
    assert _no_nan(metrics) and isinstance(metrics["auc"], float)

    # the experiment's stages write under paths.root, not into the folders above
    baseline = _merge(base, {"paths": {"features": "", "match_features": ""}})
    (tmp_path / "baseline.yaml").write_text(yaml.safe_dump(baseline))
    exp = tmp_path / "exp.yaml"
    exp.write_text(
        yaml.safe_dump(
            {
                "experiment": "tiny_chain",
                "baseline": "baseline.yaml",
                "control": "control",
                "seeds": [0],
                "n_boot": 100,
                "arms": [
                    {"name": "control", "delta": {"data": {"use_match_features": False}}},
                    {"name": "match", "delta": {"data": {"use_match_features": True}}},
                ],
            }
        )
    )
    ok("experiment", "run", exp, "--quiet")
    out = ok("experiment", "compare", "tiny_chain", "--format", "json", "--config", cfg)
    assert "NaN" not in out and "Infinity" not in out
    rows = json.loads(out)
    assert _no_nan(rows) and {r["arm"] for r in rows} == {"control", "match"}
    assert {r["metric"] for r in rows} >= {"auc", "gauc", "logloss", "lt_auc", "lt_spearman"}
    # a metric that cannot be computed on 20 users is null, and says why
    assert all(r["reason"] for r in rows if r["value"] is None)


def test_a_column_of_the_wrong_dtype_names_file_and_column(cli, tmp_path, features):
    # a folder edited by hand (the file is no longer one its manifest lists):
    # distill reads it with the features' reader, which checks dtypes, not only names
    import shutil

    folder = tmp_path / "features"
    shutil.copytree(features, folder)
    inter = folder / "interactions.parquet"
    pl.read_parquet(inter).with_columns(pl.col("label").cast(pl.String)).write_parquet(inter)
    manifest = json.loads((folder / "manifest.json").read_text())
    del manifest["outputs"]["interactions.parquet"]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    out = tmp_path / "eval"
    rc, _, err = cli("distill", "eval", "--features", folder, "--out", out, "--config", _config(tmp_path))
    assert rc == 1, err
    assert str(inter) in err and "column 'label'" in err and "dtype String" in err
    assert not out.exists()


@pytest.mark.parametrize("command", [("teachers", "fit"), ("distill", "train"), ("distill", "eval")])
def test_distill_stages_rerun_when_the_plugin_code_changes(cli, tmp_path, features, monkeypatch, command):
    # every stage's reuse key holds the plugin's source hash (features.core.provenance.stage_key):
    # the distill stages once keyed on their config and inputs only, and skipped after a code change
    from features.core import provenance

    out, cfg = tmp_path / "out", _config(tmp_path)
    rc, _, err = cli(*command, "--features", features, "--out", out, "--config", cfg)
    assert rc == 0, err
    rc, outp, err = cli(*command, "--features", features, "--out", out, "--config", cfg)
    assert rc == 0 and "up to date" in outp + err
    version, source_hash = provenance._plugin_code()
    monkeypatch.setattr(provenance, "_plugin_code", lambda: (version, source_hash + "-edited"))
    rc, outp, err = cli(*command, "--features", features, "--out", out, "--config", cfg)
    assert rc == 0, err
    assert "up to date" not in outp + err


def test_match_refuses_distilled_vectors_edited_after_their_job(cli, tmp_path, features):
    out = tmp_path / "distill"
    rc, _, err = cli("distill", "train", "--features", features, "--out", out, "--config", _config(tmp_path))
    assert rc == 0, err
    emb = out / "item_embeddings.parquet"
    pl.read_parquet(emb).with_columns(pl.col("embedding").list.eval(-pl.element())).write_parquet(emb)
    match = tmp_path / "match"
    rc, _, err = cli("features", "match", "--features", features, "--embeddings", emb, "--out", match)
    assert rc == 1 and str(emb) in err and "changed since `distill.train` wrote it" in err
    assert "recsys distill train" in err and not match.exists()
    rc, _, err = cli("features", "match", "--features", features, "--embeddings", out, "--out", match)
    assert rc == 2 and "is not a file" in err


def test_match_warns_when_the_embeddings_describe_another_items_file(cli, tmp_path, features):
    """A probe (2026-12-01): features rebuilt with edited item texts (same ids)
    took the old student's vectors silently."""
    out = tmp_path / "distill"
    rc, _, err = cli("distill", "train", "--features", features, "--out", out, "--config", _config(tmp_path))
    assert rc == 0, err
    emb = out / "item_embeddings.parquet"
    rc, said, err = cli("features", "match", "--features", features, "--embeddings", emb, "--out", tmp_path / "m1")
    assert rc == 0 and "distilled from another" not in said + err
    edited = _features_with(tmp_path / "edited", edit_items=lambda df: df.with_columns(pl.col("text") + " (new cut)"))
    rc, said, err = cli("features", "match", "--features", edited, "--embeddings", emb, "--out", tmp_path / "m2")
    assert rc == 0 and f"distilled from another items.parquet than {edited / 'items.parquet'}" in said + err
    # the ranker's own read of the vectors (ranker.use_distilled_embeddings) says the same (a probe of the fix)
    from recsys.config.sections import DataConfig
    from recsys.data import RankingData

    with contextlib.redirect_stderr(io.StringIO()) as warned:
        RankingData.load(edited, DataConfig(), embeddings_path=emb)
    assert "distilled from another items.parquet" in warned.getvalue()


def test_the_ranker_refuses_distilled_vectors_edited_after_their_job(tmp_path, features):
    import shutil

    from features.core.errors import DataError
    from recsys.data.read import load_item_embeddings

    out = tmp_path / "distill"
    _quiet_main("distill", "train", "--features", features, "--out", out, "--config", _config(tmp_path))
    ids = np.sort(pl.read_parquet(Path(features) / "items.parquet")["item_id"].to_numpy())
    load_item_embeddings(out / "item_embeddings.parquet", ids)  # intact: read
    edited = tmp_path / "edited"
    shutil.copytree(out, edited)
    emb = edited / "item_embeddings.parquet"
    pl.read_parquet(emb).with_columns(pl.col("embedding").list.eval(pl.element() * 2)).write_parquet(emb)
    with pytest.raises(DataError, match="changed since `distill.train` wrote it"):
        load_item_embeddings(emb, ids)


@pytest.mark.parametrize("where", ["same", "inside"])
def test_the_api_refuses_an_output_that_overlaps_the_features_folder(tmp_path, features, where):
    # the CLI refused it; distill.train_student wrote its manifest over the features folder's
    import shutil

    from distill import DistillConfig, train_student
    from features.core.errors import UsageError

    folder = Path(shutil.copytree(features, tmp_path / "features"))
    before = (folder / "manifest.json").read_bytes()
    out = folder if where == "same" else folder / "distill"
    with pytest.raises(UsageError, match="features_dir"):
        train_student(folder, out, DistillConfig(epochs=1), log=lambda _m: None)
    assert (folder / "manifest.json").read_bytes() == before and not (folder / "distill").exists()


# --- item images -------------------------------------------------------------------


def _png(path: Path, colour: tuple[int, int, int]) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path)


def test_image_paths_are_read_from_the_items_folder_and_image_bytes_key_the_content_stages(cli, tmp_path, monkeypatch):
    """A probe (2026-12-01): image files replaced in place (same paths) left
    every distill stage "up to date": the stale embeddings and metrics were
    reused, exit 0. Relative paths were read from wherever `distill` ran, and
    a missing file was found only after the teachers had trained."""
    import dataclasses

    from distill.config import DistillConfig
    from distill.jobs.inputs import load_inputs
    from features.core.errors import DataError

    data = tmp_path / "data"
    for i in range(1, 16):
        _png(data / "img" / f"{i}.png", (10 * i, 0, 0))
    with_images = lambda df: df.with_columns(  # noqa: E731 - half the items have a relative image path
        image_path=pl.when(pl.col("item_id") <= 15).then(pl.format("img/{}.png", pl.col("item_id"))))
    feats = _features_with(tmp_path, edit_items=with_images)
    paths = pl.read_parquet(feats / "items.parquet")["image_path"]
    assert paths.drop_nulls().to_list() == [str((data / "img" / f"{i}.png").resolve()) for i in range(1, 16)]

    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # no img/ here: the absolute paths still find the files
    first = load_inputs(feats, DistillConfig(), 0, log=lambda _m: None)
    _png(data / "img" / "3.png", (0, 0, 200))  # the same path, another picture
    second = load_inputs(feats, DistillConfig(), 0, log=lambda _m: None)
    assert second.upstream == first.upstream  # the teachers read no images: their key stays
    assert second.content_upstream != first.content_upstream
    cfg = DistillConfig()
    no_image = dataclasses.replace(cfg, student=dataclasses.replace(cfg.student, use_image=False))
    assert load_inputs(feats, no_image, 0, log=lambda _m: None).content_upstream == first.upstream
    (data / "img" / "3.png").unlink()
    with pytest.raises(DataError, match="3.png"):
        load_inputs(feats, DistillConfig(), 0, log=lambda _m: None)

    rc, _, err = cli("features", "build", "--source", "files", "--interactions", data / "interactions.parquet",
                     "--items", data / "items.parquet", "--out", tmp_path / "f2")
    assert rc == 1 and "image file not found" in err and "3.png" in err and "column 'image_path'" in err
    assert not (tmp_path / "f2").exists()
