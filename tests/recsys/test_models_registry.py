"""Promotion's guard and the student's frozen field encodings, without a
pipeline run (the whole chain: tests/integration/test_models_registry.py)."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from recsys.cli import main
from recsys.compare import CompareRow


def _row(arm: str, delta: float, lo: float, hi: float) -> CompareRow:
    import dataclasses

    names = {f.name for f in dataclasses.fields(CompareRow)}
    values = dict(arm=arm, metric="gauc", segment="all", value=0.6, delta=delta, ci_low=lo, ci_high=hi,
                  significant=lo > 0 or hi < 0, regression=hi < 0, sig_holm=False, p_value=0.01)
    return CompareRow(**{k: v for k, v in values.items() if k in names},
                      **{k: None for k in names - set(values)})


@pytest.fixture
def fake_compare(monkeypatch):
    import recsys.experiment_run as E
    import recsys.tracking.models as M

    rows = [_row("control", 0.0, 0.0, 0.0), _row("worse", -0.05, -0.08, -0.02), _row("better", 0.03, 0.01, 0.05)]
    monkeypatch.setattr(E, "compare_experiment", lambda *a, **k: (rows, "control"))
    promoted = []
    monkeypatch.setattr(E, "newest_run", lambda *a, **k: ({"params": {"seeds": "[0]"}}, [
        {"arm": a, "seed": 0, "outputs": f"/runs/{a}/seed0"} for a in ("control", "worse", "better")]))
    monkeypatch.setattr(M, "promote", lambda client, exp, arm, outputs: promoted.append((arm, outputs))
                        or {"recsys-ranker": M.ModelRef("recsys-ranker", "7", "x")})
    return promoted


def test_promote_refuses_a_significant_regression_with_exit_1(fake_compare, capsys):
    assert main(["experiment", "promote", "ab", "--arm", "worse"]) == 1
    assert "regresses on gauc" in capsys.readouterr().err
    assert fake_compare == []  # nothing moved
    assert main(["experiment", "promote", "ab", "--arm", "worse", "--no-guard"]) == 0
    assert main(["experiment", "promote", "ab", "--arm", "better"]) == 0
    assert "recsys-ranker@champion -> version 7" in capsys.readouterr().out
    assert main(["experiment", "promote", "ab", "--arm", "missing"]) == 2
    assert fake_compare == [("worse", "/runs/worse/seed0"), ("better", "/runs/better/seed0")]  # the compared run's folders


def test_promote_help_has_examples(capsys):
    with pytest.raises(SystemExit) as e:
        main(["experiment", "promote", "--help"])
    assert e.value.code == 0
    assert "recsys experiment promote ab_match_features --arm match" in capsys.readouterr().out


def test_field_encoder_freezes_the_training_catalog():
    """The student's field encoding (one implementation: FieldEncoder, which
    encode_fields fits and applies) gives an item the same tokens whatever
    batch it arrives in, and a value the catalog never had the null token."""
    from distill.encoders.fields import FieldEncoder
    from features import schemas as S

    rng = np.random.default_rng(0)
    n = 60
    items = pl.DataFrame({
        S.ITEM_ID: np.arange(n),
        "category": rng.choice(["a", "b", "c", None], n).tolist(),
        "tags": [[str(t) for t in rng.choice(["x", "y", "z"], rng.integers(0, 3))] for _ in range(n)],
        "year": np.where(rng.random(n) < 0.1, np.nan, rng.integers(1950, 2000, n).astype(float)),
    })
    kinds = S.item_field_kinds(items.schema)
    frozen = FieldEncoder.fit(items, kinds, n_buckets=5)
    whole, part = frozen.transform(items), frozen.transform(items.slice(10, 7))
    for a, b in zip(whole.tokens, part.tokens, strict=True):
        np.testing.assert_array_equal(a[10:17, : b.shape[1]], b)
    np.testing.assert_array_equal(whole.numeric[10:17], part.numeric)
    # a value the catalog never had is the field's null token, never another value's id
    new = frozen.transform(items.head(1).with_columns(pl.lit("zzz").alias("category"), pl.lit(["q"]).alias("tags")))
    null_cat, null_tags = 1, 1 + len(frozen.values["category"]) + 1
    assert new.tokens[0][0, 0] == null_cat and new.tokens[1][0, 0] == null_tags
    # a new item's inf is refused, naming the field (it was read as missing, silently; the build refuses it)
    from features.core.errors import DataError

    with pytest.raises(DataError, match="infinite value in numeric field 'year'"):
        frozen.transform(items.head(2).with_columns(pl.Series("year", [1990.0, float("-inf")])))


def test_conflicting_promote_flags_and_bad_request_arguments_are_refused(tmp_path):
    """`--guard gauc --no-guard` promoted without the guard; split="tst" gave
    an empty frame and limit=-1 all rows but one (before 2026-11-30)."""
    from recsys.serving import requests_from_features

    assert main(["experiment", "promote", "x", "--arm", "a", "--guard", "gauc", "--no-guard"]) == 2
    with pytest.raises(ValueError, match="split 'tst': one of train, valid, test"):
        requests_from_features(tmp_path, "tst")
    with pytest.raises(ValueError, match="limit -1"):
        requests_from_features(tmp_path, "test", limit=-1)
