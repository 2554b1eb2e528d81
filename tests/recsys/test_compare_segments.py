"""compare's rows by segment come from the features folder the run read; a
folder rebuilt since (another experiment sharing its path, say) must not
lend its rows to the old run's predictions."""

from __future__ import annotations

import polars as pl

from features import schemas as S
from recsys.cli import main
from recsys.compare import KEY, NEW_USER
from recsys.experiment_run import segments_fingerprint, with_segments


def _build(folder, events, *extra):
    assert main(["features", "build", "--source", "files", "--interactions", str(events), "--out", str(folder),
                 *extra]) == 0


def test_segments_only_from_the_features_folder_the_run_read(tmp_path, capsys):
    rows = [f"{u},{10 + (u * 7 + i) % 9},{1_600_000_000 + 3_600 * (i * 5 + u)},{1 + (u + i) % 5}"
            for u in range(1, 6) for i in range(12)]
    events = tmp_path / "events.csv"
    events.write_text("user_id,item_id,timestamp,rating\n" + "\n".join(rows) + "\n")
    folder = tmp_path / "features"
    _build(folder, events)
    test = pl.read_parquet(folder / S.FILES["interactions"]).filter(pl.col(S.SPLIT) == "test")
    preds = test.select(*KEY, pl.col(S.LABEL), pl.lit(0.5).alias("score"), pl.col(S.HIST_LEN))
    recorded = segments_fingerprint(folder)
    assert recorded

    got = with_segments(preds, folder, recorded=recorded)
    assert {S.COLD_ITEM, S.HIST_LEN, NEW_USER} <= set(got.columns) and got.height == preds.height

    _build(folder, events, "--label-threshold", "5")  # rebuilt in place: other interactions
    capsys.readouterr()
    logs: list[str] = []
    got = with_segments(preds, folder, recorded=recorded, log=logs.append)
    assert not {S.COLD_ITEM, S.HIST_LEN, NEW_USER} & set(got.columns)  # not even the predictions' own hist_len
    assert len(logs) == 1 and "was rebuilt after the run" in logs[0] and "no rows by segment" in logs[0]
    # a run that read the rebuilt folder gets its segments
    assert {S.COLD_ITEM, NEW_USER} <= set(with_segments(preds, folder, recorded=segments_fingerprint(folder)).columns)
