"""The global time split when a split's share rounds to every event or to
none: a split that reaches the last event keeps every event it should (it
once read as "no rows before", sending every event to test), and an empty
split is announced. Timestamps finer than seconds: events that flooring to
whole seconds merges are announced, naming their rows."""

from __future__ import annotations

import polars as pl
import pytest
import yaml

from features import schemas as S
from recsys.cli import main


def _events(n: int) -> str:
    rows = [f"{1 + i % 3},{10 + i % 5},{1_600_000_000 + 3_600 * i},{1 + i % 5}" for i in range(n)]
    return "user_id,item_id,timestamp,rating\n" + "\n".join(rows) + "\n"


def _build(tmp_path, capsys, n: int, **fracs):
    (tmp_path / "events.csv").write_text(_events(n))
    args = ["features", "build", "--source", "files", "--interactions", str(tmp_path / "events.csv"),
            "--out", str(tmp_path / "out")]
    if fracs:
        (tmp_path / "cfg.yaml").write_text(yaml.safe_dump({"features": fracs}))
        args += ["--config", str(tmp_path / "cfg.yaml")]
    rc = main(args)
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    inter = pl.read_parquet(tmp_path / "out" / S.FILES["interactions"]).sort(S.TIMESTAMP)
    return inter[S.SPLIT].to_list(), cap.out + cap.err


@pytest.mark.parametrize(
    ("n", "fracs", "expected"),
    [
        (2, {}, ["train"] * 2),  # 80% of 2 rounds to 2
        (20, {"valid_frac": 0.01, "test_frac": 0.01}, ["train"] * 20),
        (6, {}, ["train"] * 5 + ["valid"]),  # 5 / round(0.6) = 1 / 0
        (10, {}, ["train"] * 8 + ["valid", "test"]),  # nothing empty: no warning
    ],
)
def test_split_sizes_follow_the_rounded_shares(tmp_path, capsys, n, fracs, expected):
    split, log = _build(tmp_path, capsys, n, **fracs)
    assert split == expected
    empty = [k for k in ("train", "valid", "test") if k not in expected]
    if empty:
        assert f"leaves {' and '.join(empty)} empty" in log
    else:
        assert "empty" not in log


def test_a_split_with_no_train_share_is_all_valid_and_test(tmp_path, capsys):
    split, log = _build(tmp_path, capsys, 4, valid_frac=0.45, test_frac=0.45)  # train: round(0.4) = 0
    assert split == ["valid", "valid", "test", "test"]
    assert "leaves train empty" in log


def test_events_that_flooring_to_seconds_merges_are_announced_with_their_rows(tmp_path, capsys):
    # rows 3 and 4: one user and item, 500 ms apart: one event in whole seconds
    (tmp_path / "events.csv").write_text(
        "user_id,item_id,timestamp,rating\n1,9,1600000000100,5\n1,2,1600000000900,3\n1,5,1600000005000,4\n"
        "1,5,1600000005500,4\n2,9,1600000100000,5\n2,2,1600000200000,4\n3,4,1600000300000,5\n"
    )
    rc = main(["features", "build", "--source", "files", "--interactions", str(tmp_path / "events.csv"),
               "--timestamp-unit", "ms", "--out", str(tmp_path / "out")])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    log = cap.out + cap.err
    assert "2 events of the same user and item lie within one second of each other" in log and "(rows 3, 4)" in log
    assert "dropped 1 duplicate rows (same user_id, item_id, rating/label and timestamp in whole seconds" in log
    # the same file in seconds (no flooring) has nothing to announce
    (tmp_path / "s.csv").write_text("user_id,item_id,timestamp,rating\n1,5,1600000005,4\n1,5,1600000006,4\n")
    rc = main(["features", "build", "--source", "files", "--interactions", str(tmp_path / "s.csv"),
               "--out", str(tmp_path / "out_s")])
    cap = capsys.readouterr()
    assert rc == 0 and "within one second" not in cap.out + cap.err
