"""The MLflow models of a finished debug experiment: what the stages
registered, the aliases the experiment set, the pyfunc models served from the
registry (offline, CPU), and `recsys experiment promote`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from recsys.cli import main

pytestmark = pytest.mark.slow


def _client():
    from mlflow import MlflowClient

    return MlflowClient()


def test_stages_register_both_models_with_experiment_aliases(in_experiment):
    c = _client()
    ranker, student = c.get_registered_model("recsys-ranker"), c.get_registered_model("recsys-student")
    # one ranker version per TorchRec arm (LightGBM arms have none), one student
    assert {"debug_ab-control", "debug_ab-match", "debug_ab-match_svd", "debug_ab-control-seed0"} <= set(ranker.aliases)
    assert "debug_ab-lightgbm" not in ranker.aliases
    assert len({ranker.aliases[a] for a in ("debug_ab-control", "debug_ab-match", "debug_ab-match_svd")}) == 3
    # without a promotion, champion is the control arm's ranker
    assert ranker.aliases["champion"] == ranker.aliases["debug_ab-control"]
    assert ranker.tags["champion_set_by"].startswith("experiment:")
    # the control reads no student: champion is the experiment's student, the one the match arms read
    assert student.aliases["champion"] == student.aliases["debug_ab"] == student.aliases["debug_ab-match"]
    v = c.get_model_version("recsys-ranker", ranker.aliases["debug_ab-match"])
    assert (v.tags["experiment"], v.tags["arm"], v.tags["seed"]) == ("debug_ab", "match", "0")
    assert v.tags["outputs"] == str(in_experiment.arm("match").resolve())


def test_ranker_pyfunc_scores_equal_rank_train_predictions(in_experiment):
    import mlflow

    from recsys.serving import requests_from_features

    a = in_experiment.artifacts
    for arm, match in (("control", None), ("match_svd", a / "match")):
        model = mlflow.pyfunc.load_model(f"models:/recsys-ranker@debug_ab-{arm}")
        requests = requests_from_features(a / "features", "test", match)
        got = model.predict(requests.to_pandas())
        want = pl.read_parquet(in_experiment.arm(arm) / "predictions.parquet")
        assert len(got) == want.height > 0
        np.testing.assert_allclose(got["score"].to_numpy(), want["score"].to_numpy(), rtol=0, atol=1e-6)
        np.testing.assert_allclose(got["lt_score"].to_numpy(), want["lt_score"].to_numpy(), rtol=0, atol=1e-6)
        empty = model.predict(requests.head(0).to_pandas())  # was a polars list-dtype error
        assert len(empty) == 0 and list(empty.columns) == ["score", "lt_score"]
    schema = model.metadata.get_input_schema()
    sig = schema.input_names()
    assert {"user_id", "item_id", "timestamp", "history", "history_timestamps", "item_pop"} <= set(sig)
    mf = [n for n in sig if n.startswith("mf_")]
    assert mf
    # every column the scorer reads is required (MLflow inferred mf_* optional: a missing value in the example)
    assert all(c.required for c in schema.inputs), [c.name for c in schema.inputs if not c.required]
    with pytest.raises(Exception, match=f"missing inputs.*{mf[0]}"):
        model.predict(requests.to_pandas().drop(columns=[mf[0]]))
    with_missing = requests.head(3).to_pandas()
    with_missing.loc[:, mf[0]] = np.nan  # a missing match feature is a value the scorer reads
    assert model.predict(with_missing)["score"].notna().all()


def test_ranker_refuses_requests_it_would_score_wrongly(in_experiment):
    """Found by a probe (2026-11-30): each of these was scored, silently
    wrong or NaN; and scores came back on a fresh index."""
    import mlflow

    from recsys.serving import requests_from_features

    model = mlflow.pyfunc.load_model("models:/recsys-ranker@debug_ab-control")
    req = requests_from_features(in_experiment.artifacts / "features", "test")
    a = req.filter(pl.col("hist_len") > 5).head(1)
    empty = pl.lit([], pl.List(pl.Int64))
    b = a.with_columns(history=empty, history_timestamps=empty, hist_len=pl.lit(0, pl.Int64), pos_hist_len=pl.lit(0, pl.Int64))
    cases = {
        "one request has one history": pl.concat([a, b]),  # scored b with a's history (and the reverse), by row order
        "negative count": a.with_columns(item_pop=pl.lit(-1, pl.Int64)),  # log1p(-1): NaN
        "different lengths": a.with_columns(history_timestamps=pl.col("history_timestamps").list.head(1)),
        "strictly before": a.with_columns(timestamp=pl.lit(0, pl.Int64)),
        # milliseconds: scored with shifted activity windows (a frame spanning 2^33 ms said "not in time order")
        "after the year 2200 read as seconds": a.with_columns(pl.col("timestamp") * 1000,
                                                              pl.col("history_timestamps").list.eval(pl.element() * 1000)),
        "is not in time order": a.with_columns(pl.col("history_timestamps").list.reverse()),  # named no row before
        "hist_len disagrees": a.with_columns(hist_len=pl.lit(0, pl.Int64), pos_hist_len=pl.lit(0, pl.Int64)),  # dropped the history
        # shorter than the history: scored with its last hist_len events, silently (until 2026-12-01)
        "disagrees with history": a.with_columns(hist_len=pl.lit(2, pl.Int64), pos_hist_len=pl.lit(0, pl.Int64)),
        "request column 'history': 1 item id(s) not in the ranker's vocabulary": a.with_columns(  # read as a candidate's
            history=pl.concat_list(pl.col("history").list.head(pl.col("history").list.len() - 1), pl.lit([10**12], pl.List(pl.Int64)))),
    }
    for needle, frame in cases.items():
        with pytest.raises(Exception) as e:
            model.predict(frame.to_pandas())
        assert needle in str(e.value), (needle, str(e.value))
    # a direct caller may pass float columns (MLflow's schema refuses them): NaN, inf and 1.5 are no ids or counts
    from features.core.errors import DataError
    from recsys.serving.requests import check_requests

    for col, value in (("item_pop", float("nan")), ("item_pop", float("inf")), ("item_id", 1.5)):
        with pytest.raises(DataError, match=f"column '{col}'.*not a whole number"):
            check_requests(a.with_columns(pl.lit(value, pl.Float64).alias(col)))
    check_requests(a.with_columns(pl.col("item_pop").cast(pl.Float64)))  # whole floats are read
    # and inside the history lists (a probe, 2026-12-01: 12.9 was read as item 12; a null crashed)
    as_float = pl.col("history").list.eval(pl.element().cast(pl.Float64))
    with pytest.raises(DataError, match="column 'history'.*not a whole number"):
        check_requests(a.with_columns(as_float.list.eval(pl.element() + 0.9)))
    with pytest.raises(DataError, match="column 'history_timestamps'.*a null element"):
        check_requests(a.with_columns(pl.concat_list(pl.col("history_timestamps").list.head(
            pl.col("history_timestamps").list.len() - 1), pl.lit(None, pl.Int64)).alias("history_timestamps")))
    check_requests(a.with_columns(as_float))
    for frame, needle in ((a.with_columns(pl.col("history").list.eval(pl.element().cast(pl.Decimal(20, 1)) + 0.9)),
                           "not a whole number"),  # a decimal 121.9 was read as item 121 (a probe of the fix)
                          (a.with_columns(pl.lit(True).alias("item_id")), "type Boolean"),  # was item 1
                          (a.with_columns(pl.lit(1e30).alias("item_id")), "int64 range"),  # was item -2^63
                          (a.with_columns(pl.col("history").list.eval(pl.element().cast(pl.String))), "type String")):
        with pytest.raises(DataError, match=needle):
            check_requests(frame)
    # match features (a model that reads them): inf is no missing value, a count is never negative
    model = mlflow.pyfunc.load_model("models:/recsys-ranker@debug_ab-match_svd")
    req_m = requests_from_features(in_experiment.artifacts / "features", "test", in_experiment.artifacts / "match")
    m = req_m.filter(pl.col("hist_len") > 5).head(2)
    for needle, frame in {
        "column 'mf_cos_max'": m.with_columns(mf_cos_max=pl.lit(float("inf"))),
        "column 'mf_hist_len'": m.with_columns(mf_hist_len=pl.lit(-1.0)),
    }.items():
        with pytest.raises(Exception) as e:
            model.predict(frame.to_pandas())
        assert needle in str(e.value) and ("infinite value" in str(e.value) or "negative count" in str(e.value))
    assert model.predict(m.with_columns(mf_cos_max=pl.lit(None, pl.Float64)).to_pandas())["score"].notna().all()
    model = mlflow.pyfunc.load_model("models:/recsys-ranker@debug_ab-control")
    # a filtered pandas frame keeps its labels: assigning the scores back lines up
    df = req.to_pandas()
    sub = df[df["hist_len"] > 10]
    got = model.predict(sub)
    assert list(got.index) == list(sub.index)
    np.testing.assert_allclose(sub.assign(score=got["score"])["score"].to_numpy(), got["score"].to_numpy())


def test_mlflow_models_predict_cli_offline(in_experiment, tmp_path):
    """`mlflow models predict` reads JSON or CSV (MLflow 3.17 has no parquet
    input): the request rows as dataframe_records JSON."""
    from recsys.serving import requests_from_features

    requests = requests_from_features(in_experiment.artifacts / "features", "test").head(20)
    (tmp_path / "requests.json").write_text(json.dumps({"dataframe_records": requests.to_dicts()}))
    out = tmp_path / "scores.json"
    cmd = [sys.executable, "-m", "mlflow", "models", "predict", "-m", "models:/recsys-ranker@champion",
           "--env-manager", "local", "-i", str(tmp_path / "requests.json"), "-o", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = [r["score"] for r in json.loads(out.read_text())["predictions"]]
    want = pl.read_parquet(in_experiment.arm("control") / "predictions.parquet")["score"].head(20).to_numpy()
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_student_pyfunc_embeds_catalog_and_new_items(in_experiment):
    import mlflow

    model = mlflow.pyfunc.load_model("models:/recsys-student@champion")
    cols = model.metadata.get_input_schema().input_names()
    items = pl.read_parquet(in_experiment.artifacts / "features" / "items.parquet").sort("item_id")
    got = model.predict(items.select(cols).to_pandas())
    want = pl.read_parquet(in_experiment.artifacts / "distill" / "item_embeddings.parquet").sort("item_id")
    np.testing.assert_allclose(got, np.asarray(want["embedding"].to_list()), atol=1e-5)
    new = items.select(cols).head(2).with_columns(pl.Series("category", ["never seen", None]))
    emb = model.predict(new.to_pandas())
    assert emb.shape == (2, got.shape[1]) and np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert model.predict(items.select(cols).head(0).to_pandas()).shape == (0, got.shape[1])  # was a field error


def test_encode_items_matches_the_published_embeddings(in_experiment):
    from recsys import encode_items

    a = in_experiment.artifacts
    items = pl.read_parquet(a / "features" / "items.parquet").sort("item_id")
    want = pl.read_parquet(a / "distill" / "item_embeddings.parquet").sort("item_id")
    np.testing.assert_allclose(encode_items(a / "distill", a / "features", items),
                               np.asarray(want["embedding"].to_list()), atol=1e-5)
    from features.core.errors import UsageError

    for bad in (None, {"text": ["a"]}, items.lazy()):  # once polars' "expected pandas DataFrame"
        with pytest.raises(TypeError, match="items: a polars or pandas DataFrame"):
            encode_items(a / "distill", a / "features", bad)
    with pytest.raises(UsageError, match="distill_out .* is not a folder"):  # once torch's FileNotFoundError
        encode_items(a / "nope", a / "features", items)
    with pytest.raises(UsageError, match="holds no student/student.pt"):
        encode_items(a / "features", a / "features", items)
    # a probe (2026-12-01): features rebuilt on a grown catalog refitted the field vocabularies, and every
    # vector changed (mean cosine 0.55) without a word
    import shutil

    other = in_experiment.artifacts.parent / "grown_features"
    shutil.copytree(a / "features", other, dirs_exist_ok=True)
    extra = items.tail(1).with_columns(pl.col("item_id") + 100_000)
    pl.concat([items, extra]).write_parquet(other / "items.parquet")
    with pytest.raises(UsageError, match="is not the items file the student in .* trained on"):
        encode_items(a / "distill", other, items)


def test_rerun_reuses_the_registered_versions(in_experiment):
    c = _client()
    before = {n: len(c.search_model_versions(f"name = '{n}'")) for n in ("recsys-ranker", "recsys-student")}
    assert main(["experiment", "run", "experiments/debug_ab.yaml", "--quiet"]) == 0
    after = {n: len(c.search_model_versions(f"name = '{n}'")) for n in ("recsys-ranker", "recsys-student")}
    assert after == before


def test_promote_exit_statuses_and_champion(in_experiment, capsys):
    c = _client()
    assert main(["experiment", "promote", "nope", "--arm", "match"]) == 2
    assert main(["experiment", "promote", "debug_ab", "--arm", "nope"]) == 2
    assert "its arms: control, lightgbm, match, match_svd" in capsys.readouterr().err
    assert main(["experiment", "promote", "debug_ab", "--arm", "match", "--guard", "bogus"]) == 2
    assert main(["experiment", "promote", "debug_ab", "--arm", "lightgbm", "--no-guard"]) == 2
    capsys.readouterr()
    assert main(["experiment", "promote", "debug_ab", "--arm", "match", "--no-guard"]) == 0
    assert "--n-boot" not in capsys.readouterr().err  # no comparison without a guard (a probe: its warnings were shown)
    ranker = c.get_registered_model("recsys-ranker")
    assert ranker.aliases["champion"] == ranker.aliases["debug_ab-match"]
    assert ranker.tags["champion_set_by"] == "promote:debug_ab/match"
    # after a promotion, a new experiment run leaves champion alone
    assert main(["experiment", "run", "experiments/debug_ab.yaml", "--quiet"]) == 0
    assert c.get_registered_model("recsys-ranker").aliases["champion"] == ranker.aliases["debug_ab-match"]


def test_student_embeds_items_on_spark_through_spark_udf(in_experiment):
    """The registered student as a Spark UDF (`mlflow.pyfunc.spark_udf`) on a
    local[2] session: the vectors equal the published embeddings."""
    import mlflow
    from pyspark.sql.types import ArrayType, FloatType

    from features.spark.config import SparkConfig
    from features.spark.session import spark_session

    model = mlflow.pyfunc.load_model("models:/recsys-student@champion")
    cols = model.metadata.get_input_schema().input_names()
    items = pl.read_parquet(in_experiment.artifacts / "features" / "items.parquet").sort("item_id").head(40)
    want = pl.read_parquet(in_experiment.artifacts / "distill" / "item_embeddings.parquet").sort("item_id").head(40)
    with spark_session(SparkConfig(), "student-udf") as spark:
        embed = mlflow.pyfunc.spark_udf(spark, "models:/recsys-student@champion",
                                        result_type=ArrayType(FloatType()), env_manager="local")
        frame = spark.createDataFrame(items.select("item_id", *cols).to_pandas())
        rows = frame.withColumn("embedding", embed(*cols)).select("item_id", "embedding").toPandas()
    got = np.asarray(rows.sort_values("item_id")["embedding"].tolist(), dtype=np.float64)
    np.testing.assert_allclose(got, np.asarray(want["embedding"].to_list()), atol=1e-5)


def test_promote_takes_the_compared_runs_models_not_aliases_a_later_run_moved(in_experiment, capsys):
    c = _client()
    aliases = c.get_registered_model("recsys-ranker").aliases
    want, other = aliases["debug_ab-match_svd"], aliases["debug_ab-control"]
    # a later run of the experiment, killed before it finished, moved the arm's alias to its own model
    c.set_registered_model_alias("recsys-ranker", "debug_ab-match_svd", other)
    try:
        assert main(["experiment", "promote", "debug_ab", "--arm", "match_svd", "--no-guard"]) == 0
        assert f"recsys-ranker@champion -> version {want}" in capsys.readouterr().out
        assert c.get_registered_model("recsys-ranker").aliases["champion"] == want
    finally:
        c.set_registered_model_alias("recsys-ranker", "debug_ab-match_svd", want)


def test_compare_reads_the_run_back_from_another_working_directory(in_experiment, monkeypatch, tmp_path, capsys):
    """A probe (2026-12-01): with a relative paths.root the run recorded its
    arms' folders as given, and `compare` from another directory said the
    predictions were missing."""
    from recsys.cli import main
    from recsys.experiment_run import newest_run
    from recsys.tracking.config import TrackingConfig

    _, arms = newest_run(TrackingConfig(uri=in_experiment.uri), "debug_ab")
    assert arms and all(Path(a["outputs"]).is_absolute() and Path(a["features"]).is_absolute() for a in arms)
    monkeypatch.chdir(tmp_path)
    assert main(["experiment", "compare", "debug_ab", "--format", "json"]) == 0, capsys.readouterr().err
