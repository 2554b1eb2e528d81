"""The one features-folder reader: checked against features.schemas, typed
errors naming the file and the column."""

from __future__ import annotations

import polars as pl
import pytest

from features import schemas as S
from features.core.errors import DataError, SchemaError
from features.reader import kind_of, read_features_table, read_table


def _interactions(tmp_path, **over):
    df = pl.DataFrame({S.USER_ID: [1, 2], S.ITEM_ID: [3, 4], S.LABEL: pl.Series([0, 1], dtype=pl.Int8)})
    df = df.with_columns(**over) if over else df
    df.write_parquet(tmp_path / S.FILES["interactions"])
    return tmp_path


def test_every_declared_dtype_has_a_kind():
    for schema in (S.INTERACTIONS_SCHEMA, S.SEQUENCES_SCHEMA, S.ITEMS_BASE_SCHEMA, S.USERS_BASE_SCHEMA):
        for dtype in schema.dtypes():
            assert kind_of(dtype) in {"int", "float", "str", "bool", "list_int"}


def test_reads_a_table_holding_the_columns(tmp_path):
    df = read_features_table(_interactions(tmp_path), "interactions", [S.USER_ID, S.LABEL])
    assert df.columns == [S.USER_ID, S.ITEM_ID, S.LABEL] and df.height == 2


def test_missing_column_names_file_and_column(tmp_path):
    with pytest.raises(SchemaError) as e:
        read_features_table(_interactions(tmp_path), "interactions", [S.USER_ID, S.SPLIT])
    assert e.value.column == S.SPLIT and S.FILES["interactions"] in str(e.value)


def test_wrong_kind_of_dtype_is_refused(tmp_path):
    folder = _interactions(tmp_path, **{S.LABEL: pl.lit("yes")})
    with pytest.raises(SchemaError, match="is not int") as e:
        read_features_table(folder, "interactions", [S.LABEL])
    assert e.value.column == S.LABEL


def test_absent_or_broken_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="recsys features build"):
        read_features_table(tmp_path, "sequences", [S.USER_ID])
    with pytest.raises(DataError, match="does not exist"):
        read_table(tmp_path / "nowhere.parquet", "sequences", [S.USER_ID])
    (tmp_path / S.FILES["items"]).write_bytes(b"junk")
    with pytest.raises(DataError, match="not a readable parquet file"):
        read_features_table(tmp_path, "items", [S.ITEM_ID])


def test_undeclared_column_is_a_programming_error(tmp_path):
    with pytest.raises(ValueError, match="not a declared column"):
        read_features_table(_interactions(tmp_path), "interactions", ["made_up"])


def test_match_file_takes_its_keys_and_prefixed_columns(tmp_path):
    keys = {k: [1] for k in S.MATCH_KEYS}
    pl.DataFrame(keys | {f"{S.MATCH_PREFIX}cos_max": [0.5]}).write_parquet(tmp_path / S.MATCH_FILE)
    df = read_table(tmp_path / S.MATCH_FILE, "match", [*S.MATCH_KEYS, f"{S.MATCH_PREFIX}cos_max"])
    assert df.height == 1


def test_the_bytes_checked_are_the_bytes_parsed(tmp_path, monkeypatch):
    """A probe (2026-12-01): the manifest check read the file, then the
    parse read it again; a file replaced in between was read unchecked. Now
    one read serves both: a swap right after the check cannot reach the parse."""
    import features.reader as R
    from features.core.fingerprint import file_fingerprint

    folder = _interactions(tmp_path)
    path = folder / S.FILES["interactions"]
    (folder / "manifest.json").write_text(
        '{"job": "features.build", "outputs": {"%s": {"fingerprint": "%s"}}}' % (path.name, file_fingerprint(path)))
    real = R.check_manifest

    def check_then_swap(p, fingerprint=None):
        real(p, fingerprint)
        pl.DataFrame({S.USER_ID: [9], S.ITEM_ID: [9], S.LABEL: pl.Series([1], dtype=pl.Int8)}).write_parquet(path)

    monkeypatch.setattr(R, "check_manifest", check_then_swap)
    df = read_table(path, "interactions", [S.USER_ID])
    assert df[S.USER_ID].to_list() == [1, 2]  # what was checked, not what lies there now
    monkeypatch.setattr(R, "check_manifest", real)
    with pytest.raises(DataError, match="changed since"):
        read_table(path, "interactions", [S.USER_ID])
