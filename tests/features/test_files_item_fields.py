"""Files source: item columns get the field type they hold. A delimiter-
separated column (CSV has no lists) is a multi-valued field, not one category
per distinct combination; a CSV column of numbers is a numeric field, not one
category per value."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from features import schemas as S
from features import transforms as T
from recsys.cli import main

EVENTS = "user_id,item_id,timestamp,rating\n1,10,100,5\n1,11,200,3\n2,10,150,4\n2,12,300,1\n3,11,400,5\n"
ITEMS = 'item_id,text,genres,studio\n10,"Heat | 1995",Action|Crime,A\n11,Toy Story,Animation| Comedy |,B\n12,Up,,C\n'


def test_split_multi_valued_splits_only_fields_holding_the_separator():
    items = pl.DataFrame({
        "item_id": [1, 2, 3], "text": ["a|b", "c", "d"], "title": ["x|y", "z", "w"],
        "genres": ["Action|Comedy", " Drama ", None], "studio": ["A", "B", "C"], "n": [1, 2, 3],
    })
    out, found = T.split_multi_valued(items, "|")
    assert found == {"genres": 1}
    assert out["genres"].to_list() == [["Action", "Comedy"], ["Drama"], None]
    for col in ("item_id", "text", "title", "studio", "n"):  # never split, or no separator
        assert out[col].equals(items[col])
    assert S.item_field_kinds(out.schema)["multi"] == ["genres"]
    same, none = T.split_multi_valued(items, ";")
    assert none == {} and same.equals(items)


def _build(tmp_path, capsys, *extra, items: str | pl.DataFrame = ITEMS, out: str = "out"):
    """`features build` of EVENTS with `items` (CSV text, or a frame written as parquet) -> (rc, log, out)."""
    (tmp_path / "events.csv").write_text(EVENTS)
    if isinstance(items, str):
        path = tmp_path / "items.csv"
        path.write_text(items)
    else:
        path = tmp_path / "items.parquet"
        items.write_parquet(path)
    rc = main(["features", "build", "--source", "files", "--interactions", str(tmp_path / "events.csv"),
               "--items", str(path), "--out", str(tmp_path / out), *extra])
    cap = capsys.readouterr()
    return rc, cap.out + cap.err, tmp_path / out


def test_features_build_reads_pipe_separated_genres_as_a_multi_valued_field(tmp_path, capsys):
    rc, log, out = _build(tmp_path, capsys)
    assert rc == 0, log
    assert "'genres' holds '|'-separated values (2 of 3 rows)" in log
    items = pl.read_parquet(out / "items.parquet").sort(S.ITEM_ID)
    assert items["genres"].to_list() == [["Action", "Crime"], ["Animation", "Comedy"], None]
    assert items["studio"].dtype == pl.String and items[S.TEXT][0] == "Heat | 1995"  # text is never split
    # "none" keeps the old reading (one category per string), and is a different build, not a skip
    rc, log, out = _build(tmp_path, capsys, "--multi-value-sep", "none")
    assert rc == 0 and "up to date" not in log and "multi-valued" not in log
    assert pl.read_parquet(out / "items.parquet")["genres"].dtype == pl.String


def test_a_blank_separator_is_a_config_error(tmp_path, capsys):
    rc, log, out = _build(tmp_path, capsys, "--multi-value-sep", " ")
    assert rc == 2 and "multi_value_sep" in log
    assert not out.exists()


def test_the_field_encoder_refuses_strings_for_a_multi_valued_field():
    """Embedding new items with genres still as "A|B" strings would read each
    character as a value (all unknown: the null token) and embed silently wrong."""
    import pytest

    from distill.encoders.fields import FieldEncoder

    items = pl.DataFrame({"item_id": [1, 2], "genres": [["Action", "Comedy"], ["Drama"]]})
    enc = FieldEncoder.fit(items, S.item_field_kinds(items.schema))
    ok = enc.transform(items)
    assert ok.tokens[0].shape == (2, 2)
    with pytest.raises(ValueError, match="'genres' is a multi-valued field"):
        enc.transform(pl.DataFrame({"item_id": [3], "genres": ["Action|Comedy"]}))


def test_items_without_a_text_column_name_the_candidates(tmp_path, capsys):
    """A MovieLens-style movies.csv has `title`, not `text`: the error says which flag to pass."""
    movies = "item_id,title,genres\n10,Heat (1995),Action|Crime\n11,Toy Story (1995),Animation\n12,Up (2009),Animation\n"
    rc, err, out = _build(tmp_path, capsys, items=movies)
    assert rc == 1 and "items.csv" in err and "--text-column title" in err and "title, genres" in err
    assert not out.exists()
    rc, _, out = _build(tmp_path, capsys, "--text-column", "title", items=movies)
    assert rc == 0
    assert pl.read_parquet(out / "items.parquet")["genres"].dtype == pl.List(pl.String)


def test_csv_number_columns_become_numeric_fields_and_codes_stay_strings():
    items = pl.DataFrame({
        "item_id": [1, 2, 3, 4], "text": ["1", "2", "3", "4"], "year": ["1995", " 2001", "", None],
        "price": ["1.5", "2", "3e2", "nan"], "zip": ["02134", "10001", "9", "1"], "mixed": ["1", "a", "2", "3"],
    })
    out, converted, kept = T.parse_numeric_strings(items)
    assert converted == ["year", "price"]
    assert list(kept) == ["zip"] and "leading zero" in kept["zip"]  # said in the build's log (a probe, 2026-12-01)
    big = pl.DataFrame({"item_id": [1, 2], "code": ["100000000000000000001", "100000000000000000002"]})
    _, converted, kept = T.parse_numeric_strings(big)
    assert converted == [] and "beyond 2^53" in kept["code"]
    assert out["year"].to_list() == [1995, 2001, None, None] and out["year"].dtype == pl.Int64
    assert out["price"].dtype == pl.Float64 and out["price"][2] == 300.0
    for col in ("text", "zip", "mixed"):  # the text, a code with a leading zero, a non-number
        assert out[col].equals(items[col])
    assert S.item_field_kinds(out.schema)["numeric"] == ["year", "price"]


def test_features_build_types_csv_item_columns(tmp_path, capsys):
    rc, log, out = _build(tmp_path, capsys, items="item_id,text,year,genres\n10,Heat,1995,Action|Crime\n11,Toy Story,1995,Animation\n12,Up,2009,\n")
    assert rc == 0 and "'year' holds numbers only" in log
    items = pl.read_parquet(out / "items.parquet")
    assert items["year"].dtype == pl.Int64 and items["genres"].dtype == pl.List(pl.String)
    # a parquet file's string column is the user's own choice of type: kept
    frame = pl.DataFrame({"item_id": [10, 11, 12], "text": ["a", "b", "c"], "code": ["1", "2", "3"]})
    rc, _, out = _build(tmp_path, capsys, items=frame, out="out2")
    assert rc == 0 and pl.read_parquet(out / "items.parquet")["code"].dtype == pl.String


def test_parquet_field_types_the_encoders_cannot_read_are_cast_not_dropped(tmp_path, capsys):
    """A pandas category (Categorical), a flag, a Decimal price and integer tag
    lists were left out of `item_fields` without a word (2026-11-30)."""
    import decimal

    items = pl.DataFrame({
        "item_id": [10, 11, 12], "text": ["a", "b", "c"],
        "genre": pl.Series(["x", "y", "x"], dtype=pl.Categorical), "flag": [True, False, None],
        "price": pl.Series([decimal.Decimal("1.5"), decimal.Decimal("2"), None], dtype=pl.Decimal(10, 2)),
        "tags": [[1, 2], [3], None],
    })
    rc, log, out = _build(tmp_path, capsys, items=items)
    assert rc == 0, log
    assert "'genre' read as a field of another type (Categorical -> String)" in log
    got = pl.read_parquet(out / "items.parquet").sort(S.ITEM_ID)
    assert got["flag"].to_list() == ["true", "false", None] and got["price"].to_list() == [1.5, 2.0, None]
    assert got["tags"].to_list() == [["1", "2"], ["3"], None]
    assert S.item_field_kinds(got.schema) == {"categorical": ["genre", "flag"], "multi": ["tags"], "numeric": ["price"], "image": []}


def test_item_columns_that_cannot_be_used_are_refused(tmp_path, capsys):
    import datetime as dt

    base = {"item_id": [10, 11, 12], "text": ["a", "b", "c"]}
    cases = [
        (pl.DataFrame(base | {"released": [dt.date(2000, 1, 1)] * 3}), "'released'", "type Date"),
        (pl.DataFrame(base | {"score": [1.0, float("inf"), 2.0]}), "'score', row 2", "infinite"),
        ("item_id,text,score\n10,a,1.5\n11,b,2\n12,c,-inf\n", "'score', row 3", "infinite"),
        ("item_id,text,first_ts\n10,a,5\n11,b,6\n12,c,7\n", "'first_ts'", "reserved column name"),  # was: overwrote the stats
        (",item_id,text\n0,10,a\n1,11,b\n2,12,c\n", "column 1 has no name", "index=False"),  # was: a field named ''
        # pandas' index in a parquet file (a probe, 2026-12-01: read as a "reserved column name")
        (pl.DataFrame(base | {"__index_level_0__": [5, 7, 9]}), "'__index_level_0__'", "a pandas index"),
    ]
    for i, (items, where, needle) in enumerate(cases):
        rc, log, out = _build(tmp_path, capsys, items=items, out=f"out{i}")
        assert rc == 1 and where in log and needle in log, log
        assert not out.exists()


def test_csv_numbers_keep_their_values(tmp_path, capsys):
    """17-digit codes stay distinct (a float parse merged them); NaN is a missing value."""
    items = ("item_id,text,sku,score,year\n10,a,12345678901234567,1.5,1991\n11,b,12345678901234568,nan,NA\n"
             "12,c,12345678901234569,,None\n")
    rc, log, out = _build(tmp_path, capsys, items=items)
    assert rc == 0, log
    got = pl.read_parquet(out / "items.parquet").sort(S.ITEM_ID)
    assert got["sku"].dtype == pl.Int64 and got["sku"].n_unique() == 3
    assert got["score"].to_list() == [1.5, None, None] and "'score' holds numbers only" in log  # "nan" text: missing
    # a float NaN in a parquet field is a missing value too (logged)
    parquet = pl.DataFrame({"item_id": [10, 11, 12], "text": ["a", "b", "c"], "w": [0.5, float("nan"), 2.0]})
    rc, log, out = _build(tmp_path, capsys, items=parquet, out="out_nan")
    assert rc == 0 and "'w': 1 NaN values read as missing" in log, log
    assert pl.read_parquet(out / "items.parquet").sort(S.ITEM_ID)["w"].to_list() == [0.5, None, 2.0]
    assert got["year"].to_list() == [1991, None, None]  # R's NA and pandas' None are missing numbers, not categories


def test_a_mistyped_text_column_is_a_usage_error_and_paths_do_not_key_the_build(tmp_path, capsys, monkeypatch):
    items = "item_id,text,description\n10,a,x\n11,b,y\n12,c,z\n"
    rc, log, out = _build(tmp_path, capsys, "--text-column", "descriptoin", items=items)
    assert rc == 2 and "--text-column descriptoin" in log and "text, description" in log  # was: read 'text'
    rc, log, out = _build(tmp_path, capsys, items=items)
    assert rc == 0, log
    # the same files named relative to the working folder: up to date (the key holds contents, not paths)
    monkeypatch.chdir(tmp_path)
    rc = main(["features", "build", "--source", "files", "--interactions", "events.csv", "--items", "items.csv", "--out", "out"])
    assert rc == 0 and "up to date" in capsys.readouterr().out


def test_a_pandas_category_of_numbers_is_a_categorical_field(tmp_path, capsys):
    # polars reads a pandas `category` of numbers as a number column; the
    # parquet's pandas metadata says the writer meant one category per value
    import pandas as pd

    (tmp_path / "events.csv").write_text(EVENTS)
    items = pd.DataFrame({
        "item_id": [10, 11, 12], "text": ["Heat", "Toy Story", "Up"],
        "zip": pd.Categorical([2134, 90210, 2134]), "label_code": pd.Categorical(["x", "y", "x"]),
        "year": [1995, 1995, 2009],
    })
    items.to_parquet(tmp_path / "items.parquet")
    assert pl.read_parquet(tmp_path / "items.parquet")["zip"].dtype == pl.Int64  # the reading this fixes
    rc = main(["features", "build", "--source", "files", "--interactions", str(tmp_path / "events.csv"),
               "--items", str(tmp_path / "items.parquet"), "--out", str(tmp_path / "out")])
    cap = capsys.readouterr()
    log = cap.out + cap.err
    assert rc == 0, log
    assert "'zip' is a pandas category of numbers: read as a categorical field" in log
    out = pl.read_parquet(tmp_path / "out" / "items.parquet").sort(S.ITEM_ID)
    assert out["zip"].to_list() == ["2134", "90210", "2134"]
    assert out["year"].dtype == pl.Int64 and out[S.ITEM_ID].dtype.is_integer()  # plain numbers stay numbers
    kinds = S.item_field_kinds(out.schema)
    assert "zip" in kinds["categorical"] and "year" in kinds["numeric"]


def test_numeric_categories_never_retype_the_id_or_text():
    items = pl.DataFrame({"item_id": [1, 2], "text": ["a", "b"], "zip": [1, 2], "n": [3.5, 4.0]})
    out, cast = T.numeric_categories(items, ["item_id", "zip", "text", "absent"])
    assert cast == ["zip"] and out["zip"].to_list() == ["1", "2"]
    assert out["item_id"].dtype == pl.Int64 and out["n"].dtype == pl.Float64


def test_a_text_column_of_lists_is_a_schema_error_naming_file_and_column(tmp_path, capsys):
    items = pl.DataFrame({"item_id": [10, 11, 12], "text": [["a", "b"], ["c"], ["d"]]})
    rc, log, out = _build(tmp_path, capsys, items=items)
    assert rc == 1, log
    assert "items.parquet" in log and "column 'text'" in log and "is not text: join the values into one string" in log
    assert "unexpected" not in log and not out.exists()



def _image_items(folder, cell: str) -> str:
    from PIL import Image

    (folder / "img").mkdir(exist_ok=True)
    for i in (10, 11, 12):
        Image.new("RGB", (4, 4), (i, 0, 0)).save(folder / "img" / f"{i}.png")
    return f"item_id,text,image_path\n10,Heat,img/10.png\n11,Toy Story,{cell}\n12,Up,\n"


def test_image_paths_that_name_no_file_say_what_they_are(tmp_path, capsys):
    """A probe (2026-12-01): a folder and a URL were both "not found" (the URL
    as a mangled local path), and a cell padded with spaces was not found."""
    (tmp_path / "img").mkdir()
    for cell, needle in (("img", "is a folder, not an image file"), ("http://example.com/x.png", "is a URL"),
                         ("img/none.png", "not found")):
        rc, log, out = _build(tmp_path, capsys, items=_image_items(tmp_path, cell), out="o")
        assert rc == 1 and needle in log and "row 2" in log and "column 'image_path'" in log and not out.exists(), log
    rc, log, out = _build(tmp_path, capsys, items=_image_items(tmp_path, "  img/11.png  "), out="padded")
    assert rc == 0, log
    assert pl.read_parquet(out / "items.parquet")["image_path"].to_list()[1] == str(tmp_path.resolve() / "img" / "11.png")


def test_the_same_items_file_in_another_folder_rebuilds_when_it_names_images(tmp_path, capsys):
    """A probe (2026-12-01): relative image paths are resolved against the items
    file's folder, but the build's key held the file's bytes only: the same file
    beside other pictures was "up to date", and the features kept the first folder's paths."""
    import shutil

    for name in ("a", "b"):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "items.csv").write_text(_image_items(folder, "img/11.png"))
        (folder / "events.csv").write_text(EVENTS)

    def build(name: str) -> tuple[int, str]:
        rc = main(["features", "build", "--source", "files", "--interactions", str(tmp_path / name / "events.csv"),
                   "--items", str(tmp_path / name / "items.csv"), "--out", str(tmp_path / "out")])
        said = capsys.readouterr()
        return rc, said.out + said.err

    assert build("a")[0] == 0
    rc, log = build("b")
    assert rc == 0 and "up to date" not in log
    assert pl.read_parquet(tmp_path / "out" / "items.parquet")["image_path"][0].startswith(str((tmp_path / "b").resolve()))
    shutil.copytree(tmp_path / "b", tmp_path / "c")  # no images named: still keyed by content alone
    (tmp_path / "c" / "items.csv").write_text(ITEMS)
    (tmp_path / "b" / "items.csv").write_text(ITEMS)
    assert build("b")[0] == 0
    rc, log = build("c")
    assert rc == 0 and "up to date" in log


def test_a_home_relative_image_cell_and_a_quoted_home_out_follow_the_home_folder(tmp_path, capsys, monkeypatch):
    """A probe (2026-12-01): an image cell `~/img/11.png` was expanded with
    $HOME, which the build's key left out (another home: "up to date" with the
    first home's pictures); a quoted `--out "~/out"` died (polars expanded the
    `~`, the temp folder did not)."""
    monkeypatch.chdir(tmp_path)  # where a literal `~` folder would appear
    for home in ("h1", "h2"):
        (tmp_path / home).mkdir()
        _image_items(tmp_path / home, "img/11.png")
    (tmp_path / "items.csv").write_text(_image_items(tmp_path, "~/img/11.png"))
    (tmp_path / "events.csv").write_text(EVENTS)

    def build(home: str, out: str) -> tuple[int, str]:
        monkeypatch.setenv("HOME", str(tmp_path / home))
        rc = main(["features", "build", "--source", "files", "--interactions", str(tmp_path / "events.csv"),
                   "--items", str(tmp_path / "items.csv"), "--out", out])
        said = capsys.readouterr()
        return rc, said.out + said.err

    rc, log = build("h1", "~/out")
    assert rc == 0, log
    assert pl.read_parquet(tmp_path / "h1" / "out" / "items.parquet")["image_path"][1] == str(tmp_path / "h1" / "img" / "11.png")
    assert not (tmp_path / "~").exists()
    assert build("h1", str(tmp_path / "o"))[0] == 0
    rc, log = build("h2", str(tmp_path / "o"))
    assert rc == 0 and "up to date" not in log, log
    assert pl.read_parquet(tmp_path / "o" / "items.parquet")["image_path"][1] == str(tmp_path / "h2" / "img" / "11.png")


def test_only_path_flags_expand_a_quoted_home():
    """`--multi-value-sep "~"` is a separator, not the home folder."""
    import argparse

    from recsys.cli import expand_quoted_home

    args = argparse.Namespace(out="~/o", config="~", multi_value_sep="~", text_column="~/t", items="a/~/b")
    expand_quoted_home(args)
    home = str(Path.home())
    assert (args.out, args.config) == (home + "/o", home)
    assert (args.multi_value_sep, args.text_column, args.items) == ("~", "~/t", "a/~/b")


def test_a_null_separator_is_said_in_the_log(tmp_path):
    """A probe (2026-12-01): YAML reads an unquoted `multi_value_sep: ~` (or `#`)
    as null, which silently kept 'Horror~Comedy' one category."""
    from features.jobs import FeaturesConfig, build_features

    (tmp_path / "events.csv").write_text(EVENTS)
    (tmp_path / "items.csv").write_text(ITEMS)
    said: list[str] = []
    build_features(FeaturesConfig(source="files", interactions=str(tmp_path / "events.csv"),
                                  items=str(tmp_path / "items.csv"), multi_value_sep=None), tmp_path / "out", log=said.append)
    assert any("multi_value_sep is null" in m and "quote it" in m for m in said)
    assert pl.read_parquet(tmp_path / "out" / "items.parquet")["genres"].dtype == pl.String
