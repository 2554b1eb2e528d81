"""Inputs and accuracy tables of the attention benchmark (`recsys.bench.attention`).

Shape legend: N items, L history length, C candidates, D embedding dim, R rank.

Timing data: an item table (N x D) with a decaying spectrum (scale k^-1/2 on
a random rotation, rows ~ unit norm); a request draws L history items with
Zipf-like popularity (repeats included) and C candidates uniformly.

Accuracy tables (float64, no timing):
  `compact_fidelity`   compact and truncated vs the reference on X with
                       singular values sqrt(L) 2^-k, per R.
  `truncation_error`   truncated mode's error on histories from a
                       low-rank-plus-noise item table (`low_rank_noise_table`).
  `trained_truncation_error`  the same on real ML-100K histories embedded by
                       a trained ranker's item table (`train_ml100k_ranker`
                       trains one briefly; `load_trained_table` reads a
                       checkpoint and its features folder).
"""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from recsys.modules.reference_attention import reference_target_attention
from recsys.modules.svd_attention import SVDAttention, SVDAttentionConfig


def item_table(n_items: int, dim: int, gen: torch.Generator) -> torch.Tensor:
    """(n_items, D) embeddings with a decaying spectrum and rows of ~unit norm."""
    scale = torch.arange(1, dim + 1, dtype=torch.float32).rsqrt()  # (D,)
    rot, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen))  # (D, D)
    items = (torch.randn(n_items, dim, generator=gen) * scale) @ rot  # (N, D)
    return items / scale.square().sum().sqrt()


def sample_request(items: torch.Tensor, length: int, cands: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """History (1, L, D) with Zipf-like popularity (repeats happen) and candidates (1, C, D)."""
    n = items.shape[0]
    popularity = 1.0 / (torch.arange(n, dtype=torch.float64) + 10.0)  # (N,)
    hist_ids = torch.multinomial(popularity, length, replacement=True, generator=gen)  # (L,)
    cand_ids = torch.randint(0, n, (cands,), generator=gen)  # (C,)
    return items[hist_ids][None], items[cand_ids][None]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-300))


def compact_fidelity(
    dim: int, length: int, cands: int, ranks: list[int], gen: torch.Generator
) -> list[dict[str, Any]]:
    """Relative error vs the reference, per R, on X with singular values sqrt(L) 2^-k (float64).

    Rows: R, rel_err (compact), rel_err_normalized (compact, normalize_tokens),
    rel_err_truncated (truncated mode, lossless at R = D).
    """
    u, _ = torch.linalg.qr(torch.randn(length, dim, generator=gen, dtype=torch.float64))  # (L, D)
    v, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))  # (D, D)
    sv = math.sqrt(length) * 2.0 ** -torch.arange(dim, dtype=torch.float64)  # (D,)
    x = ((u * sv) @ v.mT)[None]  # (1, L, D)
    q = torch.randn(1, cands, dim, generator=gen, dtype=torch.float64)  # (1, C, D)
    lengths = torch.tensor([length])
    w = [torch.randn(dim, dim, generator=gen, dtype=torch.float64) / math.sqrt(dim) for _ in range(3)]
    ref = reference_target_attention(x, lengths, q, *w)
    rows = []
    for r in ranks:
        errs = {}
        for key, mode, norm in (("rel_err", "compact", False), ("rel_err_normalized", "compact", True),
                                ("rel_err_truncated", "truncated", False)):
            m = SVDAttention(SVDAttentionConfig(dim=dim, rank=r, mode=mode, normalize_tokens=norm)).double()
            m.load_state_dict({"w_q": w[0], "w_k": w[1], "w_v": w[2]})
            with torch.no_grad():
                errs[key] = rel_err(m(x, lengths, q), ref)
        rows.append({"R": r, **errs})
    return rows


def low_rank_noise_table(n_items: int, dim: int, strong: int, noise: float, gen: torch.Generator) -> torch.Tensor:
    """(n_items, D): `strong` unit-variance directions plus isotropic noise of std `noise`, randomly rotated."""
    scale = torch.full((dim,), noise)  # (D,)
    scale[:strong] = torch.sqrt(torch.tensor(1.0 + noise**2))
    rot, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen))  # (D, D)
    return (torch.randn(n_items, dim, generator=gen) * scale) @ rot  # (N, D)


def truncation_error(quick: bool, gen: torch.Generator) -> list[dict[str, Any]]:
    """Truncated mode's error vs the reference on low-rank-plus-noise histories (float64).

    Per (D, R, L): the median and 90th percentile over users of rel_err, the
    median fraction of a history's energy in its top R singular values, and
    the median numerical rank (singular values above 1e-3 s_1).
    """
    settings = [(16, 8, 60), (16, 8, 200)] if quick else [(16, 8, 60), (16, 8, 200), (64, 32, 1_000)]
    users = 8 if quick else 64
    rows = []
    for dim, rank, length in settings:
        items = low_rank_noise_table(2_000, dim, 4, 0.35, gen).double()
        w = [torch.randn(dim, dim, generator=gen, dtype=torch.float64) / math.sqrt(dim) for _ in range(3)]
        m = SVDAttention(SVDAttentionConfig(dim=dim, rank=rank, mode="truncated", gram_dtype="float64")).double()
        m.load_state_dict({"w_q": w[0], "w_k": w[1], "w_v": w[2]})
        errs, energy, ranks = [], [], []
        for _ in range(users):
            x, q = sample_request(items, length, 50, gen)  # (1, L, D), (1, C, D)
            lengths = torch.tensor([length])
            with torch.no_grad():
                errs.append(rel_err(m(x, lengths, q), reference_target_attention(x, lengths, q, *w)))
            s = torch.linalg.svdvals(x[0])
            energy.append(float(s[:rank].square().sum() / s.square().sum()))
            ranks.append(int((s > 1e-3 * s[0]).sum()))
        errs.sort()
        rows.append({"D": dim, "R": rank, "L": length, "C": 50, "mode": "truncated", "users": users,
                     "rel_err": statistics.median(errs), "rel_err_p90": errs[int(0.9 * (len(errs) - 1))],
                     "energy_top_r": statistics.median(energy), "numerical_rank": statistics.median(ranks),
                     "data": "low-rank-plus-noise item table (4 strong directions + noise 0.35), not a trained table"})
    return rows


# Item-table key suffixes in a ranker checkpoint (`recsys.models.ranker.Ranker`)
_TABLE_KEY = "item_embeddings.embeddings.item.weight"
_PROJECTIONS = ("history_encoder.w_q", "history_encoder.w_k", "history_encoder.w_v")


def train_ml100k_ranker(work: Path, epochs: int, seed: int, log: Any = print) -> tuple[Path, Path]:
    """Build ML-100K features into `work` and train the ranker briefly there
    (svd_compact, D = 16, R = 8: the shipped A/B's match_svd encoder, without
    match features). Returns (features folder, best checkpoint)."""
    from features.jobs import FeaturesConfig, build_features
    from recsys.config.sections import DataConfig, RankerConfig, TrainConfig
    from recsys.data import RankingData
    from recsys.train import fit

    features = work / "features"
    build_features(FeaturesConfig(), features, log=lambda _m: None)
    data = RankingData.load(features, DataConfig())
    ranker = RankerConfig(embedding_dim=16, svd_rank=8, history_encoder="svd_compact")
    t0 = time.perf_counter()
    metrics = fit(data, ranker, TrainConfig(epochs=epochs, progress=False, resume=False), work / "ranker", seed=seed)
    log(f"trained the ranker on ML-100K for {metrics['epochs_run']} epoch(s) in {time.perf_counter() - t0:.0f}s "
        f"(test GAUC {metrics['gauc']:.3f})")
    return features, work / "ranker" / "checkpoints" / "best.pt"


def load_trained_table(checkpoint: Path, features: Path) -> tuple[torch.Tensor, list[torch.Tensor] | None, list[np.ndarray]]:
    """A ranker checkpoint's item table (N, D) float64, its history encoder's
    (W_Q, W_K, W_V) when it has one, and every user's history from
    `features`/sequences.parquet as table rows (oldest first).

    Table row i is the i-th smallest item id of items.parquet and the
    interactions (`RankingData`'s indexing)."""
    import polars as pl

    from features import schemas as S

    state = torch.load(checkpoint, weights_only=True, map_location="cpu")
    state = state.get("model", state)
    table = next((v for k, v in state.items() if k.endswith(_TABLE_KEY)), None)
    if table is None:
        raise ValueError(f"{checkpoint}: no item table ({_TABLE_KEY}) in the checkpoint")
    found = [next((v for k, v in state.items() if k.endswith(p)), None) for p in _PROJECTIONS]
    weights = None if any(w is None for w in found) else [w.double() for w in found]
    ids = np.unique(np.concatenate([
        pl.read_parquet(features / S.FILES["items"], columns=[S.ITEM_ID])[S.ITEM_ID].to_numpy(),
        pl.read_parquet(features / S.FILES["interactions"], columns=[S.ITEM_ID])[S.ITEM_ID].to_numpy(),
    ]))
    if len(ids) != table.shape[0]:
        raise ValueError(f"{checkpoint}: item table has {table.shape[0]} rows but {features} has {len(ids)} items: "
                         "pass the features folder the checkpoint was trained on")
    seqs = pl.read_parquet(features / S.FILES["sequences"], columns=[S.ITEM_IDS])[S.ITEM_IDS].to_list()
    histories = [np.searchsorted(ids, np.asarray(s, dtype=np.int64)) for s in seqs if s]
    return table.double(), weights, histories


def trained_truncation_error(
    table: torch.Tensor, weights: list[torch.Tensor] | None, histories: list[np.ndarray], ranks: list[int],
    gen: torch.Generator, *, cands: int = 50, max_len: int = 1_000, data: str = "",
) -> list[dict[str, Any]]:
    """Truncated mode's error vs the reference on real histories embedded by a
    trained item table (float64), per R: median and p90 over users of rel_err,
    median top-R energy share and numerical rank (as `truncation_error`).

    Each user's last `max_len` events are the history; the C queries are
    items drawn uniformly from the table. Projections: the checkpoint's
    (W_Q, W_K, W_V) when given, else random ones like `truncation_error`'s.
    """
    dim = table.shape[1]
    if weights is None:
        weights = [torch.randn(dim, dim, generator=gen, dtype=torch.float64) / math.sqrt(dim) for _ in range(3)]
    rows = []
    users = [h[-max_len:] for h in histories if len(h) >= 2]
    lengths_all = [len(h) for h in users]
    for rank in ranks:
        m = SVDAttention(SVDAttentionConfig(dim=dim, rank=rank, mode="truncated", gram_dtype="float64")).double()
        m.load_state_dict({"w_q": weights[0], "w_k": weights[1], "w_v": weights[2]})
        errs, energy, num_rank = [], [], []
        for h in users:
            x = table[torch.from_numpy(h)][None]  # (1, L, D)
            q = table[torch.randint(0, table.shape[0], (cands,), generator=gen)][None]  # (1, C, D)
            lengths = torch.tensor([len(h)])
            with torch.no_grad():
                errs.append(rel_err(m(x, lengths, q), reference_target_attention(x, lengths, q, *weights)))
            s = torch.linalg.svdvals(x[0])
            energy.append(float(s[:rank].square().sum() / s.square().sum()))
            num_rank.append(int((s > 1e-3 * s[0]).sum()))
        errs.sort()
        rows.append({"D": dim, "R": rank, "L": int(statistics.median(lengths_all)), "C": cands, "mode": "truncated",
                     "users": len(users), "rel_err": statistics.median(errs),
                     "rel_err_p90": errs[int(0.9 * (len(errs) - 1))], "energy_top_r": statistics.median(energy),
                     "numerical_rank": statistics.median(num_rank), "data": data})
    return rows
