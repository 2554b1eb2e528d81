"""The attention bench's truncation table on a trained item table
(`recsys.bench.attention_cases`: `load_trained_table`, `trained_truncation_error`),
on a checkpoint written here in the ranker's key layout."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch

from features import schemas as S
from recsys.bench import attention as bench
from recsys.bench.attention_cases import load_trained_table, trained_truncation_error


def _checkpoint(tmp_path, features, dim: int, low_rank: bool) -> tuple:
    ids = np.unique(np.concatenate([
        pl.read_parquet(features / S.FILES["items"])[S.ITEM_ID].to_numpy(),
        pl.read_parquet(features / S.FILES["interactions"])[S.ITEM_ID].to_numpy(),
    ]))
    gen = torch.Generator().manual_seed(0)
    table = torch.randn(len(ids), dim, generator=gen)
    if low_rank:  # rank-2 table (up to float32 rounding): truncation at R >= 2 is lossless
        table = torch.randn(len(ids), 2, generator=gen) @ torch.randn(2, dim, generator=gen)
    state = {"model.item_embeddings.embeddings.item.weight": table}
    for name in ("w_q", "w_k", "w_v"):
        state[f"model.history_encoder.{name}"] = torch.randn(dim, dim, generator=gen) / dim**0.5
    path = tmp_path / "best.pt"
    torch.save({"model": state, "epoch": 1}, path)
    return path, table


def test_reads_the_table_projections_and_histories(tmp_path, synthetic_features):
    path, table = _checkpoint(tmp_path, synthetic_features, 8, low_rank=False)
    got, weights, histories = load_trained_table(path, synthetic_features)
    assert torch.equal(got, table.double()) and len(weights) == 3
    seqs = pl.read_parquet(synthetic_features / S.FILES["sequences"])
    assert len(histories) == (seqs[S.ITEM_IDS].list.len() > 0).sum()
    assert all(h.min() >= 0 and h.max() < table.shape[0] for h in histories)


def test_error_is_zero_when_lossless_and_positive_otherwise(tmp_path, synthetic_features):
    gen = torch.Generator().manual_seed(1)
    path, _ = _checkpoint(tmp_path, synthetic_features, 8, low_rank=True)
    rows = trained_truncation_error(*load_trained_table(path, synthetic_features), [2], gen, data="low rank")
    assert rows[0]["rel_err"] < 1e-6 and rows[0]["numerical_rank"] <= 2 and rows[0]["data"] == "low rank"
    path, _ = _checkpoint(tmp_path, synthetic_features, 8, low_rank=False)
    rows = trained_truncation_error(*load_trained_table(path, synthetic_features), [2, 4], gen)
    assert [r["R"] for r in rows] == [2, 4]
    assert rows[0]["rel_err"] > rows[1]["rel_err"] > 1e-3  # more rank kept, less error
    assert {"D", "R", "L", "C", "mode", "users", "rel_err", "rel_err_p90", "energy_top_r"} <= set(rows[0])


def test_a_checkpoint_of_other_data_is_refused(tmp_path, synthetic_features):
    path, _ = _checkpoint(tmp_path, synthetic_features, 8, low_rank=False)
    state = torch.load(path, weights_only=True)
    state["model"]["model.item_embeddings.embeddings.item.weight"] = torch.zeros(3, 8)
    torch.save(state, path)
    with pytest.raises(ValueError, match="features folder"):
        load_trained_table(path, synthetic_features)


def test_cli_takes_checkpoint_and_features_together(tmp_path, synthetic_features):
    path, _ = _checkpoint(tmp_path, synthetic_features, 16, low_rank=False)
    assert bench.main(["--quick", "--checkpoint", str(path), "--out", str(tmp_path)]) == 2
    with torch.random.fork_rng():
        assert bench.main(["--quick", "--checkpoint", str(path), "--features", str(synthetic_features),
                           "--out", str(tmp_path)]) == 0
    import json

    payload = json.loads((tmp_path / "attention.json").read_text())
    assert [r["R"] for r in payload["truncation_trained"]] == [4, 8]
