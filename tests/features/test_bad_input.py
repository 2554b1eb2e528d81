"""Bad input: a clear message naming file, column and row; exit 2 for usage or
config errors, 1 for data errors; nothing written under the final names."""

from __future__ import annotations

import polars as pl
import pytest

from recsys.cli import main

GOOD = "user_id,item_id,timestamp,rating\n1,10,100,5\n1,11,200,3\n2,10,150,4\n2,12,300,1\n3,11,400,5\n"


def _run(tmp_path, capsys, inter_text=None, *, inter_path=None, extra=()):
    if inter_path is None:
        inter_path = tmp_path / "events.csv"
        inter_path.write_text(inter_text)
    out = tmp_path / "out"
    rc = main(["features", "build", "--source", "files", "--interactions", str(inter_path), "--out", str(out), *extra])
    err = capsys.readouterr().err
    return rc, err, out


def _nothing_written(out):
    return not out.exists() or not any(p.suffix in {".parquet", ".json"} for p in out.iterdir())


@pytest.mark.parametrize(
    ("text", "column", "row", "needle"),
    [
        ("user_id,item_id,rating\n1,10,5\n", "timestamp", None, "missing required column"),
        ("user_id,item_id,timestamp,rating\n1,10,100,5\n2,11,200,4\nabc,12,300,3\n", "user_id", 3, "not an integer"),
        ("user_id,item_id,timestamp,rating\n1,10,100,5\n2,,200,4\n", "item_id", 2, "null"),
        ("user_id,item_id,timestamp,rating\n1,10,100,5\n-2,11,200,4\n", "user_id", 2, "negative"),
        ("user_id,item_id,timestamp,rating\n1,10,100,5\n2,11,200,NaN\n", "rating", 2, "NaN"),
        ("user_id,item_id,timestamp,rating\n1,10,100,5\n2,11,20x0,4\n", "timestamp", 2, "not an epoch time"),
        ("user_id,item_id,timestamp,label\n1,10,100,1\n2,11,200,3\n", "label", 2, "0 or 1"),
        ("user_id,item_id,timestamp,rating\n1,10,100,5\n1,10,100,2\n", "user_id,item_id,timestamp", 2, "disagree"),
        # before 2026-11-30 each of these exited 0 with a wrong table
        ("user_id,item_id,timestamp,rating,label\n1,10,100,4,\n1,11,200,,\n2,10,300,,1\n", "rating|label", 2, "no rating and no label"),
        ("user_id,item_id,timestamp,rating\n1,10,100,5\n007,11,200,4\n7,12,300,4\n", "user_id", None, "rows 2, 3: different ids read as one: '007' and '7' are both id 7"),
        ("user_id,item_id,timestamp,rating\n1,10,100,5\n1e3,11,200,4\n1000,12,300,4\n", "user_id", None, "rows 2, 3: different ids read as one: '1e3' and '1000'"),
        ("user_id,item_id,timestamp,rating\n123456789012345678.0,10,100,5\n123456789012345679.0,11,200,4\n", "user_id", None, "rows 1, 2: value is not an integer id"),
        ("user_id,item_id,timestamp,rating\n1,10,100,5\n2,11,200,inf\n", "rating", 2, "infinite rating"),
        ("user_id,item_id,timestamp,rating\n1,10,1600000000,5\n2,11,0,4\n", "timestamp", 2, "before 1974"),
        # a probe (2026-12-01): these were told to convert "date-time text"
        ("user_id,item_id,timestamp,rating\n1,10,1600000000,5\n2,11,9e18,4\n", "timestamp", 2, "number beyond 2^53"),
        ("user_id,item_id,timestamp,rating\n1,10,1600000000,5\n2,11,9223372036854775808,4\n", "timestamp", 2,
         "number beyond 2^53"),
    ],
    ids=["missing-column", "wrong-dtype", "null-id", "negative-id", "nan-rating", "bad-timestamp", "label-range", "conflicting-duplicates",
         "no-rating-no-label", "ids-merged-by-leading-zero", "ids-merged-by-exponent", "float-id-past-2-53", "inf-rating",
         "zero-timestamp-among-dates", "timestamp-9e18", "timestamp-past-int64"],
)
def test_data_errors_name_file_column_row(tmp_path, capsys, text, column, row, needle):
    rc, err, out = _run(tmp_path, capsys, text)
    assert rc == 1, err
    assert "events.csv" in err and repr(column) in err and needle in err
    if row is not None:
        assert f"row {row}" in err
    assert _nothing_written(out)


def test_exact_duplicates_dropped_with_warning_or_error_by_policy(tmp_path, capsys):
    text = GOOD + "1,10,100,5\n"
    rc, err, out = _run(tmp_path, capsys, text)
    assert rc == 0
    assert pl.read_parquet(out / "interactions.parquet").height == 5
    cfg = tmp_path / "strict.yaml"
    cfg.write_text("features:\n  on_duplicate: error\n")
    rc, err, out2 = _run(tmp_path, capsys, text, extra=["--config", str(cfg), "--force"])
    assert rc == 1 and "duplicate" in err and "row 6" in err


def test_unsorted_input_is_accepted_and_sorted(tmp_path, capsys):
    lines = GOOD.strip().split("\n")
    shuffled = "\n".join([lines[0], *reversed(lines[1:])]) + "\n"
    rc, _, out = _run(tmp_path, capsys, shuffled)
    assert rc == 0
    a = pl.read_parquet(out / "interactions.parquet")
    sorted_dir = tmp_path / "sorted"
    sorted_dir.mkdir()
    rc, _, out2 = _run(sorted_dir, capsys, GOOD)
    b = pl.read_parquet(out2 / "interactions.parquet")
    assert a.equals(b)
    assert a["user_id"].is_sorted()


@pytest.mark.parametrize("content", ["", "user_id,item_id,timestamp,rating\n"], ids=["zero-bytes", "header-only"])
def test_empty_file(tmp_path, capsys, content):
    rc, err, out = _run(tmp_path, capsys, content)
    assert rc == 1 and "events.csv" in err and ("empty" in err or "no rows" in err)
    assert _nothing_written(out)


def test_corrupt_parquet(tmp_path, capsys):
    p = tmp_path / "events.parquet"
    p.write_bytes(b"PAR1" + b"\x00garbage" * 50)
    rc, err, out = _run(tmp_path, capsys, inter_path=p)
    assert rc == 1 and "events.parquet" in err and "parquet" in err
    assert _nothing_written(out)


def test_wrong_dtype_in_parquet(tmp_path, capsys):
    p = tmp_path / "events.parquet"
    pl.DataFrame({"user_id": [[1], [2]], "item_id": [1, 2], "timestamp": [1, 2], "rating": [5.0, 4.0]}).write_parquet(p)
    rc, err, _ = _run(tmp_path, capsys, inter_path=p)
    assert rc == 1 and "'user_id'" in err and "wrong dtype" in err


def test_unknown_config_key_is_usage_error(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("features:\n  label_treshold: 3\n")
    rc, err, out = _run(tmp_path, capsys, GOOD, extra=["--config", str(cfg)])
    assert rc == 2 and "label_treshold" in err and "label_threshold" in err  # did-you-mean
    assert _nothing_written(out)


def test_wrong_config_type_is_usage_error(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("features:\n  history_cap: lots\n")
    rc, err, _ = _run(tmp_path, capsys, GOOD, extra=["--config", str(cfg)])
    assert rc == 2 and "history_cap" in err and "expected int" in err


def test_unreadable_path_is_usage_error(tmp_path, capsys):
    rc, err, out = _run(tmp_path, capsys, inter_path=tmp_path / "nope.csv")
    assert rc == 2 and "nope.csv" in err and "does not exist" in err
    assert _nothing_written(out)


def test_items_file_problems(tmp_path, capsys):
    items = tmp_path / "items.csv"
    items.write_text("item_id,text\n10,a\n11,b\n")  # 12 missing
    rc, err, out = _run(tmp_path, capsys, GOOD, extra=["--items", str(items)])
    assert rc == 1 and "missing from the items file" in err and "[12]" in err and "row 4:" in err and "add them to the items file" in err
    items.write_text("item_id,text\n10,a\n11,b\n12,c\n11,d\n")
    rc, err, out = _run(tmp_path, capsys, GOOD, extra=["--items", str(items)])
    assert rc == 1 and "duplicate item id" in err and "rows 2, 4" in err and "items.csv" in err
    items.write_text("item_id,year,genre,name\n10,1995,x,a\n11,1996,x,b\n12,1995,y,c\n")
    rc, err, out = _run(tmp_path, capsys, GOOD, extra=["--items", str(items)])
    # a column of numbers is no text (every CSV column arrives as a string); most distinct values first
    assert rc == 1 and "'text'" in err and "its text columns: name, genre (e.g. --text-column name)" in err, err
    rc, err, out = _run(tmp_path, capsys, GOOD, extra=["--items", str(items), "--text-column", "name"])
    assert rc == 0
    assert pl.read_parquet(out / "items.parquet")["text"].to_list() == ["a", "b", "c"]


def test_missing_required_flag_is_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["features", "build", "--source", "files"])
    assert e.value.code == 2
    rc = main(["features", "build", "--source", "files", "--out", "/tmp/never-written-x"])
    assert rc == 2 and "--interactions" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "unit", "rows", "needle"),
    [
        # 1997 in seconds read as ms: every time within 1970-01 (the old check only looked for 2000 on)
        ("user_id,item_id,timestamp,rating\n1,10,874965758,5\n2,11,880000000,4\n", "ms", "rows 1, 2", "use --timestamp-unit s"),
        # one row in seconds among milliseconds
        ("user_id,item_id,timestamp,rating\n1,10,1600000000000,5\n1,11,1600000200,4\n2,10,1600000300000,3\n", "ms", "row 2",
         "another unit"),
        # seconds read as ms with one outlier row (past 2200 in seconds) keeping the latest out of January 1970:
        # accepted before (a probe, 2026-12-01), every event in 1970 and no LT label left
        ("user_id,item_id,timestamp,rating\n1,10,1600000000,5\n2,11,1600000300,4\n3,12,8000000000,4\n", "ms",
         "rows 1, 2, 3", "use --timestamp-unit s"),
        # the same with a 0 as the outlier
        ("user_id,item_id,timestamp,rating\n1,10,880000000,5\n2,11,880000300,4\n3,12,0,4\n" + "".join(
            f"{4 + i},13,{880000400 + i},4\n" for i in range(120)), "ms", "rows 1, 2, 3", "use --timestamp-unit s"),
        # ... and with a block of 0 placeholders (3%: the first percentile was 0)
        ("user_id,item_id,timestamp,rating\n" + "".join(f"{i},10,0,4\n" for i in range(1, 5)) + "".join(
            f"{5 + i},13,{880000400 + i},4\n" for i in range(120)), "ms", "rows 1, 2, 3, 4, 5", "use --timestamp-unit s"),
        # ... and with one row that is a plausible millisecond time (it said to drop all the others)
        ("user_id,item_id,timestamp,rating\n1,10,880000000,5\n2,11,880000300,4\n3,12,2000000000000,4\n", "ms",
         "rows 1, 2", "use --timestamp-unit s"),
        # the same file in seconds: the outlier row is named, not the unit (it said "use --timestamp-unit ms")
        ("user_id,item_id,timestamp,rating\n1,10,1600000000,5\n2,11,1600000300,4\n3,12,8000000000,4\n", "s",
         "row 3", "fix or drop those rows"),
    ],
    ids=["seconds-as-ms-1997", "one-row-in-seconds", "seconds-as-ms-with-an-outlier", "seconds-as-ms-with-a-0",
         "seconds-as-ms-with-zeros", "seconds-as-ms-with-one-ms-row", "one-row-past-2200"],
)
def test_timestamps_in_the_wrong_unit_are_refused(tmp_path, capsys, text, unit, rows, needle):
    rc, err, out = _run(tmp_path, capsys, text, extra=["--timestamp-unit", unit])
    assert rc == 1 and "'timestamp'" in err and rows in err and needle in err, err
    assert _nothing_written(out)


def test_common_real_formats_are_read(tmp_path, capsys):
    """Refused before (second probe, 2026-11-30): text true/false labels
    (pandas, polars CSVs), fractional epoch seconds (time.time()), "33.0"
    beside "33" (two pandas exports), and a parquet date column."""
    import datetime as dt

    text = "user_id,item_id,timestamp,label\n33.0,10,1600000000.75,True\n33,11,1600000100.25,false\n2,10,1600000200,TRUE\n"
    rc, err, out = _run(tmp_path, capsys, text)
    assert rc == 0, err
    df = pl.read_parquet(out / "interactions.parquet").sort("timestamp")
    assert df["user_id"].to_list() == [33, 33, 2] and df["timestamp"].to_list() == [1600000000, 1600000100, 1600000200]
    assert df["label"].to_list() == [1, 0, 1]
    path = tmp_path / "dates.parquet"
    pl.DataFrame({"user_id": [1, 1, 2], "item_id": [10, 11, 10], "rating": [5, 3, 4],
                  "timestamp": [dt.date(2009, 5, 4), dt.date(2009, 5, 5), dt.date(2009, 5, 6)]}).write_parquet(path)
    rc, err, out = _run(tmp_path, capsys, inter_path=path, extra=["--force"])
    assert rc == 0, err
    assert sorted(pl.read_parquet(out / "interactions.parquet")["timestamp"].to_list()) == [1241395200, 1241481600, 1241568000]


def test_text_ids_and_date_text_get_messages_that_say_what_to_do(tmp_path, capsys):
    rc, err, _ = _run(tmp_path, capsys, "user_id,item_id,timestamp,rating\nA2SUAM1J3GNN3B,10,100,5\n")
    assert rc == 1 and "map text ids" in err and "2^53" in err
    rc, err, _ = _run(tmp_path, capsys, "user_id,item_id,timestamp,rating\n1,10,2009-05-04T23:08:57Z,5\n")
    assert rc == 1 and "not an epoch time" in err and "parquet datetime" in err


def test_relative_times_and_plain_text_ids_are_accepted(tmp_path, capsys):
    """Small relative times (no calendar) pass; " 7 " is id 7, and "1000.0" (pandas) is id 1000."""
    text = "user_id,item_id,timestamp,rating\n 7 ,10,100,5\n7,11,200,3\n1000.0,10,150,4\n2,12,300,1\n"
    rc, err, out = _run(tmp_path, capsys, text)
    assert rc == 0, err
    df = pl.read_parquet(out / "interactions.parquet")
    assert sorted(df["user_id"].unique().to_list()) == [2, 7, 1000] and df["timestamp"].max() == 300


def test_a_decimal_id_with_a_fraction_is_refused_not_truncated(tmp_path, capsys):
    """A non-strict cast to Int64 would read Decimal 1.5 as id 1."""
    import decimal

    path = tmp_path / "dec.parquet"
    ids = pl.Series([decimal.Decimal("1.5"), decimal.Decimal("2"), decimal.Decimal("3")], dtype=pl.Decimal(10, 1))
    pl.DataFrame({"user_id": [1, 2, 3], "item_id": ids, "timestamp": [100, 200, 300], "rating": [4, 5, 3]}).write_parquet(path)
    rc, err, out = _run(tmp_path, capsys, inter_path=path)
    assert rc == 1 and "'item_id', row 1" in err and "whole number" in err, err
    assert _nothing_written(out)


def test_a_utf16_csv_is_named_as_such(tmp_path, capsys):
    path = tmp_path / "events.csv"
    path.write_bytes(GOOD.encode("utf-16"))  # with its byte-order mark (Excel's "Unicode text")
    rc, err, out = _run(tmp_path, capsys, inter_path=path)
    assert rc == 1 and "events.csv" in err and "UTF-16 text, not UTF-8: save it as UTF-8" in err
    assert _nothing_written(out)


def test_interaction_columns_the_build_does_not_read_are_ignored_whatever_their_name(tmp_path, capsys):
    # `__row` is the build's own row-number column: a user's extra column of that name once collided with it
    lines = GOOD.splitlines()
    text = lines[0] + ",__row,__raw_user_id\n" + "".join(f"{line},x,y\n" for line in lines[1:])
    rc, err, out = _run(tmp_path, capsys, text)
    assert rc == 0, err
    assert pl.read_parquet(out / "interactions.parquet").height == len(lines) - 1


def test_dictionary_encoded_id_columns_are_read_as_their_text(tmp_path, capsys):
    # a pandas `category` of id strings was refused as "wrong dtype Categorical"
    import pandas as pd

    df = pl.read_csv(GOOD.encode()).to_pandas()
    for col in ("user_id", "item_id"):
        df[col] = pd.Categorical(df[col].astype(str))
    df.to_parquet(tmp_path / "events.parquet")
    items = pd.DataFrame({"item_id": pd.Categorical(["10", "11", "12"]), "text": ["a", "b", "c"]})
    items.to_parquet(tmp_path / "items.parquet")
    rc, err, out = _run(tmp_path, capsys, inter_path=tmp_path / "events.parquet",
                        extra=("--items", str(tmp_path / "items.parquet")))
    assert rc == 0, err
    inter = pl.read_parquet(out / "interactions.parquet")
    assert inter["user_id"].dtype == pl.Int64 and sorted(inter["item_id"].unique().to_list()) == [10, 11, 12]


def test_spark_flags_without_the_spark_engine_are_a_usage_error(tmp_path, capsys):
    # they were silently ignored: a forgotten --engine spark ran polars
    rc, err, out = _run(tmp_path, capsys, GOOD, extra=("--spark-master", "local[2]"))
    assert rc == 2 and "--spark-master applies to --engine spark (this run's engine is polars)" in err
    assert not out.exists()


@pytest.mark.parametrize("tail", ["\n\n", "\n\n\n", "\r\n\r\n", "\n\r\n"], ids=["one", "two", "crlf", "mixed"])
def test_trailing_blank_csv_lines_are_skipped_with_a_note(tmp_path, capsys, tail):
    """Refused before (2026-12-01) as "null value" rows: polars reads each
    blank line as a row of nulls, and exports often leave some at the end."""
    body = GOOD.rstrip("\n").replace("\n", "\r\n" if tail.startswith("\r") else "\n")
    inter = tmp_path / "events.csv"
    inter.write_bytes((body + tail).encode())
    items = tmp_path / "items.csv"
    items.write_bytes(b"item_id,text\n10,a\n11,b\n12,c\n\n")
    out = tmp_path / "out"
    rc = main(["features", "build", "--source", "files", "--interactions", str(inter), "--items", str(items), "--out", str(out)])
    said = "".join(capsys.readouterr())
    assert rc == 0, said
    n_blank = tail.count("\n") - 1
    assert f"{n_blank} blank line" in said and "events.csv" in said and "items.csv: 1 blank line" in said
    assert pl.read_parquet(out / "interactions.parquet").height == 5
    assert pl.read_parquet(out / "items.parquet").height == 3


def test_a_blank_line_between_rows_is_still_refused_with_its_row(tmp_path, capsys):
    rc, err, out = _run(tmp_path, capsys, GOOD.replace("\n1,11", "\n\n1,11", 1))
    assert rc == 1 and "row 2" in err and "null value" in err and _nothing_written(out)


def test_a_parquet_date_past_2200_is_named_as_a_date_without_a_unit_hint(tmp_path, capsys):
    """Before (2026-12-01) the message said the dates "look like
    milliseconds: use --timestamp-unit ms", which a datetime column ignores."""
    import datetime as dt

    path = tmp_path / "dates.parquet"
    pl.DataFrame({"user_id": [1, 1, 2], "item_id": [10, 11, 10], "rating": [5, 3, 4],
                  "timestamp": [dt.datetime(2009, 5, 4), dt.datetime(9999, 12, 31), dt.datetime(2009, 5, 6)]}).write_parquet(path)
    rc, err, out = _run(tmp_path, capsys, inter_path=path)
    assert rc == 1 and "row 2" in err and "dates after the year 2200" in err and "9999-12-31" in err, err
    assert "timestamp-unit" not in err and _nothing_written(out)


def test_csv_shapes_a_user_gets_wrong_are_named(tmp_path, capsys):
    """Found by a probe (2026-12-01): an items row with a field missing put
    its values in the wrong columns (exit 0); a ';'-separated file, spaces
    around header names and an unescaped quote got messages without a cause."""
    items = tmp_path / "items.csv"
    items.write_text('item_id,text,genre\n10,"a, quoted\nline",x\n11,b\n12,c,z\n')
    rc, err, out = _run(tmp_path, capsys, GOOD, extra=["--items", str(items)])
    assert rc == 1 and "column 'genre', row 2: 2 fields (line 4 of the file), the header has 3" in err, err
    assert _nothing_written(out)
    rc, err, _ = _run(tmp_path, capsys, GOOD.replace(",", ";"))
    assert rc == 1 and "looks separated by ';'" in err, err
    rc, err, _ = _run(tmp_path, capsys, GOOD.replace(",", ", ", 3))
    assert rc == 1 and "' item_id'" in err and "remove the spaces" in err, err
    rows = [f"{i},item {i},c{i % 5}" for i in range(10, 100)]
    rows[2] = '12,12" vinyl record,c2'  # polars cannot split the rest of the file
    items.write_text("item_id,text,genre\n" + "\n".join(rows) + "\n")
    rc, err, _ = _run(tmp_path, capsys, GOOD, extra=["--items", str(items)])
    assert rc == 1 and 'a " inside a field that is not quoted' in err, err


def test_both_label_and_rating_say_which_each_row_takes(tmp_path, capsys):
    text = "user_id,item_id,timestamp,rating,label\n1,10,100,5,\n1,11,200,1,1\n2,10,150,4,0\n2,12,300,2,\n3,11,400,5,\n"
    inter = tmp_path / "events.csv"
    inter.write_text(text)
    rc = main(["features", "build", "--source", "files", "--interactions", str(inter), "--out", str(tmp_path / "out")])
    said = "".join(capsys.readouterr())
    assert rc == 0 and "2 rows take their 'label'" in said and "3 rows without one take rating >= 4.0" in said, said
    assert "every train event has label" not in said
    inter.write_text(text.replace(",1,1\n", ",1,\n").replace(",4,0\n", ",4,\n").replace(",2,\n", ",5,\n").replace(",1,\n", ",5,\n"))
    rc = main(["features", "build", "--source", "files", "--interactions", str(inter), "--out", str(tmp_path / "out2")])
    said = "".join(capsys.readouterr())
    assert rc == 0 and "every train event has label 1" in said and "both 'label' and" not in said, said


@pytest.mark.parametrize("out", ["/proc/recsys-probe/out", "/sys/recsys-probe"])
def test_an_output_under_a_kernel_filesystem_is_refused_before_any_work(capsys, out):
    """Root passes os.access there; the job then failed late, exit 1, as an
    "unexpected" error (a probe, 2026-12-01)."""
    rc = main(["features", "build", "--source", "synthetic", "--users", "20", "--max-events", "30", "--out", out])
    assert rc == 2 and "is not writable" in capsys.readouterr().err


def test_a_row_with_more_fields_than_the_header_names_its_line(tmp_path, capsys):
    rc, err, out = _run(tmp_path, capsys, GOOD.replace("\n2,10,150,4\n", "\n2,10,150,4,9\n"))
    assert rc == 1 and "line 4 of the file has more fields than the header" in err, err
    assert _nothing_written(out)


def test_more_csv_shapes_a_user_gets_wrong_are_named(tmp_path, capsys):
    """Found by a probe (2026-12-01, second round): an interactions row with a
    middle field left out put its label into the rating column (a positive
    read as a negative, exit 0); spaces around the items' text header, CR-only
    line ends and a field that goes on after its closing quote were blamed on
    something else, or named no line."""
    inter = "user_id,item_id,timestamp,rating,label\n1,10,100,5,\n1,11,200,3,\n2,10,150,1\n2,12,300,1,\n3,11,400,5,\n"
    rc, err, out = _run(tmp_path, capsys, inter)
    assert rc == 1 and "column 'label', row 3: 4 fields (line 4 of the file), the header has 5" in err, err
    assert _nothing_written(out)
    items = tmp_path / "items.csv"
    items.write_text("item_id, text, genre\n10,a,x\n11,b,y\n12,c,z\n")
    rc, err, _ = _run(tmp_path, capsys, GOOD, extra=["--items", str(items)])
    assert rc == 1 and "missing the item text column" in err and "(' text') do not match: remove the spaces" in err, err
    rc, err, out = _run(tmp_path, capsys, GOOD.replace("\n", "\r"))
    assert rc == 1 and "carriage return alone" in err and "events.csv" in err, err
    assert _nothing_written(out)
    items.write_text('item_id,text,genre\n10,a,x\n11,"Weird" Al movie,y\n12,c,z\n')
    rc, err, _ = _run(tmp_path, capsys, GOOD, extra=["--items", str(items)])
    assert rc == 1 and "(line 3 of the file)" in err and 'a " inside a field that is not quoted' in err, err
    rc, err, _ = _run(tmp_path, capsys, GOOD.replace("\n", "\r\n"))  # CRLF stays fine
    assert rc == 0, err


def test_third_round_of_export_shapes_is_refused(tmp_path, capsys):
    """Found by a probe (2026-12-01, third round), each exit 0 before: a field
    over 131,072 characters switched the short-row check off; ' label' or
    'Label' was ignored (labels came from the ratings); dates written
    20200913 among epoch seconds read as August 1970, and a whole column of
    them as one day; CR-only line ends with a quoted line feed were blamed
    on the header."""
    long_text = "x" * 140_000
    inter = f"user_id,item_id,timestamp,rating,label,note\n1,10,100,5,,\"{long_text}\"\n1,11,200,3,,\n2,10,150,1\n"
    rc, err, out = _run(tmp_path, capsys, inter)
    assert rc == 1 and "row 3: 4 fields (line 4 of the file), the header has 6" in err, err
    assert _nothing_written(out)
    for header, fix in ((" label", "remove the spaces around it"), ("Label", "write it in lower case")):
        rc, err, out = _run(tmp_path, capsys, f"user_id,item_id,timestamp,rating,{header}\n1,10,100,1,1\n2,11,200,2,1\n")
        assert rc == 1 and f"column {header!r} would not be read as 'label'" in err and fix in err, err
    dates = "".join(f"{i},10,{1600000000 + 1000 * i},4\n" for i in range(1, 20))
    rc, err, _ = _run(tmp_path, capsys, "user_id,item_id,timestamp,rating\n" + dates + "20,11,20200913,5\n")
    assert rc == 1 and "row 20: timestamps before 1974 or written as dates" in err and "20200913" in err, err
    rc, err, _ = _run(tmp_path, capsys, "user_id,item_id,timestamp,rating\n1,10,20200913,5\n2,11,20200914,4\n")
    assert rc == 1 and "most timestamps read as dates written as digits" in err, err
    rc, err, _ = _run(tmp_path, capsys, "user_id,item_id,timestamp,rating\n1,10,43000,5\n2,11,43001,4\n3,12,43100,2\n")
    assert rc == 0, err  # relative times (Excel serial days, say) still pass
    rc, err, out = _run(tmp_path, capsys, 'user_id,item_id,timestamp,rating,note\r1,10,100,5,"two\nlines"\r2,11,200,4,x\r')
    assert rc == 1 and "carriage return alone" in err, err


def test_dates_written_as_integers_are_refused_whatever_their_share_and_real_early_dates_are_kept(tmp_path, capsys):
    """A verification probe (2026-12-01): dates written YYYYMMDD as the
    majority beside epoch seconds, a YYYYMMDD column with one 0, and
    YYYYMMDDhh (2034 in seconds) were read, exit 0; real 1975 dates in a
    parquet date column and relative milliseconds over two years were refused."""
    head = "user_id,item_id,timestamp,rating\n"
    ymd = "".join(f"{i},10,{19971001 + i},4\n" for i in range(1, 16)) + "".join(
        f"{i},11,{880000000 + i},4\n" for i in range(16, 21))
    rc, err, _ = _run(tmp_path, capsys, head + ymd)
    assert rc == 1 and "dates written as digits" in err and "rows 1, 2, 3, 4, 5" in err and "(15 rows in all)" in err, err
    rc, err, _ = _run(tmp_path, capsys, head + "1,10,19971001,4\n2,11,0,4\n3,12,19971003,4\n")
    assert rc == 1 and "most timestamps read as dates written as digits" in err, err
    rc, err, _ = _run(tmp_path, capsys, head + "1,10,1997100103,4\n2,11,1997100214,4\n")
    assert rc == 1 and "YYYYMMDDhh" in err, err
    # ... a column with one 99999999 placeholder, MMDDYYYY, and YYYYMMDDhh rows among epoch seconds (2030s)
    for text in ("1,10,19971001,4\n2,11,99999999,4\n3,12,19971003,4\n", "1,10,12051997,4\n2,11,1011998,4\n3,12,12311997,4\n"):
        rc, err, _ = _run(tmp_path, capsys, head + text)
        assert rc == 1 and "most timestamps read as dates written as digits" in err, err
    rc, err, _ = _run(tmp_path, capsys, head + "1,10,880000000,4\n2,11,1998042223,4\n3,12,880000300,4\n")
    assert rc == 1 and "row 2: timestamps that read as dates written YYYYMMDDhh" in err, err
    rel_ms = "".join(f"{i},{10 + i % 3},{i * 3_000_000_000},4\n" for i in range(1, 22))  # two years of relative ms
    rc, err, _ = _run(tmp_path, capsys, head + rel_ms, extra=["--timestamp-unit", "ms"])
    assert rc == 0, err
    dated = tmp_path / "dated.parquet"
    import datetime as dt

    pl.DataFrame({"user_id": [1, 2, 3, 1], "item_id": [10, 11, 12, 11], "rating": [4.0, 5.0, 3.0, 2.0],
                  "timestamp": [dt.date(1975, 3, 1), dt.date(1999, 5, 1), dt.date(2004, 1, 2), dt.date(2004, 2, 2)]}
                 ).write_parquet(dated)
    rc, err, _ = _run(tmp_path, capsys, inter_path=dated)
    assert rc == 0, err


def test_quote_pairs_that_swallow_lines_and_line_ends_are_judged_on_the_whole_file(tmp_path, capsys):
    """A verification probe (2026-12-01): two `12" vinyl` titles in an ignored
    column made polars read the lines between them as one field: half the
    events were lost, exit 0. An LF file with quoted CRs was called CR-only,
    and a CR-only file with two quoted LFs per cell was not."""
    vinyl = '12" vinyl'
    rows = [f"{1 + i % 7},{10 + i % 5},{100 + i},4,{vinyl if i % 50 == 3 else 'plain'}" for i in range(300)]
    rc, err, out = _run(tmp_path, capsys, "user_id,item_id,timestamp,rating,title\n" + "\n".join(rows) + "\n")
    assert rc == 1 and "rows where the file holds 300 records: line 5 holds a \" inside an unquoted field" in err, err
    assert _nothing_written(out)
    lf_cr = "user_id,item_id,timestamp,rating,note\n" + "".join(f'{i},10,{100 + i},4,"a\rb\rc"\n' for i in range(1, 6))
    rc, err, _ = _run(tmp_path, capsys, lf_cr)
    assert rc == 0, err
    cr_lf = "user_id,item_id,timestamp,rating,note\r" + "".join(f'{i},10,{100 + i},4,"a\nb\nc"\r' for i in range(1, 6))
    rc, err, _ = _run(tmp_path, capsys, cr_lf)
    assert rc == 1 and "carriage return alone" in err, err


def test_a_lone_carriage_return_inside_a_field_is_named(tmp_path, capsys):
    """A verification probe (2026-12-01): `Copy\\rcat` in an LF file read as a
    short row, and the message blamed a missing field only."""
    items = tmp_path / "items.csv"
    items.write_bytes(b"item_id,text,genre\n10,a,x\n11,Copy\rcat,y\n12,c,z\n")
    rc, err, _ = _run(tmp_path, capsys, GOOD, extra=["--items", str(items)])
    assert rc == 1 and "carriage return inside a field" in err, err


def test_a_pipeline_config_without_a_features_section_builds_with_its_defaults(tmp_path, capsys):
    """A probe (2026-12-01): `features build --config` read a pipeline config
    with no `features:` section as a file of feature keys and refused its
    `name` as an unknown feature key."""
    cfg = tmp_path / "pipe.yaml"
    cfg.write_text("name: x\nseed: 3\ndata:\n  history_cap: 50\n")
    rc, err, out = _run(tmp_path, capsys, GOOD, extra=["--config", str(cfg)])
    assert rc == 0 and (out / "interactions.parquet").is_file(), err
    cfg.write_text("history_cap: 30\nseed: 2\n")  # feature keys beside a pipeline key: still refused, named
    rc, err, _ = _run(tmp_path, capsys, GOOD, extra=["--config", str(cfg)])
    assert rc == 2 and "unknown key 'seed'" in err, err


def test_real_2030s_seconds_are_read_and_digit_dates_among_milliseconds_are_refused(tmp_path, capsys):
    """A verification probe (2026-12-01): real epoch seconds of 2030-2039 were
    refused because ~0.9% of them parse as YYYYMMDDhh; 199712041555 among
    epoch milliseconds read as 1976, exit 0; a datetime column's refusal
    spoke of seconds and of 20200913."""
    import datetime as dt

    head = "user_id,item_id,timestamp,rating\n"
    real = "".join(f"{1 + i % 9},{10 + i % 7},{1_926_120_603 + 3_607 * i},4\n" for i in range(200))  # 2031
    rc, err, _ = _run(tmp_path, capsys, head + real)
    assert rc == 0, err
    ms = "".join(f"{1 + i % 9},{10 + i % 7},{880_000_000_000 + 60_000 * i},4\n" for i in range(40))
    rc, err, _ = _run(tmp_path, capsys, head + ms + "50,11,199712041555,4\n", extra=["--timestamp-unit", "ms"])
    assert rc == 1 and "row 41: timestamps before 1974 or written as dates when read as milliseconds" in err, err
    dated = tmp_path / "dated.parquet"
    pl.DataFrame({"user_id": [1, 2, 3], "item_id": [10, 11, 12], "rating": [4.0, 5.0, 3.0],
                  "timestamp": [dt.datetime(1970, 1, 1, 7), dt.datetime(1999, 5, 1), dt.datetime(2004, 1, 2)]}
                 ).write_parquet(dated)
    rc, err, _ = _run(tmp_path, capsys, inter_path=dated)
    assert rc == 1 and "row 1: dates within January 1970, beside others from 1980 on" in err and "20200913" not in err, err


def test_features_build_checks_the_whole_pipeline_config_and_honours_reuse_false(tmp_path, capsys):
    """A verification probe (2026-12-01): a misplaced top-level `source:` was
    ignored (another source was built, exit 0), and `tracking.reuse: false`
    did not recompute, unlike every other command."""
    cfg = tmp_path / "pipe.yaml"
    cfg.write_text("features:\n  history_cap: 50\nsource: synthetic\n")
    rc, err, _ = _run(tmp_path, capsys, GOOD, extra=["--config", str(cfg)])
    assert rc == 2 and "unknown section 'source'" in err, err
    cfg.write_text("features:\n  history_cap: 50\ntracking:\n  reuse: false\n  enabled: false\n")
    (tmp_path / "events.csv").write_text(GOOD)
    argv = ["features", "build", "--source", "files", "--interactions", str(tmp_path / "events.csv"),
            "--out", str(tmp_path / "out"), "--config", str(cfg)]
    for _ in range(2):
        assert main(argv) == 0
        out = capsys.readouterr().out
        assert "features: wrote" in out and "up to date" not in out, out
    cfg.write_text("features:\n  history_cap: 50\n")  # reuse on (the default): the rerun skips
    assert main(argv) == 0 and "up to date" in capsys.readouterr().out
