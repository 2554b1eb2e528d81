"""Cold-start protocol (`prepare_cold_start`):
- Held-out items: a share (`holdout_frac`, default 0.2) of the items that have
  train events, drawn with `np.random.default_rng(seed)`. ALL their
  interactions are removed from teacher and student training: teachers and
  student learn only from train-split positives of the other items.
- warm item = has train events and is not held out; cold item = held out or
  without any train event. Teachers "know" the items with >= 1 train positive
  that are not held out (`known`); only those can be retrieved by a teacher.
- The valid split is for choices (early stopping, model selection); the
  test split is reported. Nothing is ever chosen on test. The student's
  early stopping averages valid Recall@k over warm and cold targets, so the
  held-out items' valid-period interactions inform which epoch is kept
  (never a gradient); their test-period interactions are only reported.

Shape legend:
    I  items, U users, N impressions, H history kept per impression
    P  train positives
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import polars as pl

from features import schemas as S
from features.core.errors import DataError


@dataclass
class Impressions:
    """Positive impressions of one split, ready for retrieval."""

    users: np.ndarray  # (N,) dense user index
    targets: np.ndarray  # (N,) dense item index
    hist: np.ndarray  # (N, H) right-aligned history of dense item indices, -1 = padding
    cold: np.ndarray  # (N,) bool: target is a cold item
    exclude_offsets: np.ndarray | None = None  # (N + 1,) into exclude_values
    exclude_values: np.ndarray | None = None  # items excluded from each ranking

    def __len__(self) -> int:
        return len(self.targets)

    def excluded(self) -> list[np.ndarray]:
        if self.exclude_offsets is None:
            return [np.zeros(0, np.int64)] * len(self)
        o, v = self.exclude_offsets, self.exclude_values
        return [v[o[i] : o[i + 1]] for i in range(len(self))]


@dataclass
class ColdStartData:
    """Everything the teachers, the student and the evaluation need, in dense
    indices: items in items.parquet order, users in sorted user_id order."""

    item_ids: np.ndarray  # (I,)
    user_ids: np.ndarray  # (U,)
    heldout: np.ndarray  # (I,) bool
    warm: np.ndarray  # (I,) bool: has train events and not held out
    known: np.ndarray  # (I,) bool: warm with >= 1 train positive (teachers learn these)
    train_users: np.ndarray  # (P,) train positives minus held-out items ...
    train_items: np.ndarray  # (P,) ... in time order
    train_sequences: list[np.ndarray]  # per user with train positives, item indices in time order
    train: Impressions  # train positives with a (held-out-free) earlier positive history
    valid: Impressions
    test: Impressions
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    @property
    def n_users(self) -> int:
        return len(self.user_ids)


def _dense(ids: np.ndarray, universe: np.ndarray, what: str, file: str) -> np.ndarray:
    pos = np.searchsorted(universe, ids)
    pos = np.clip(pos, 0, max(len(universe) - 1, 0))
    bad = len(universe) == 0 or (universe[pos] != ids).any()
    if bad:
        missing = np.setdiff1d(ids, universe)[:5].tolist()
        raise DataError(f"{what} ids not found in the catalog: {missing}", file=file, column=what)
    return pos


def _flatten(col: pl.Series) -> tuple[np.ndarray, np.ndarray]:
    """List column -> (values, offsets (n + 1,))."""
    lengths = col.list.len().fill_null(0).to_numpy().astype(np.int64)
    values = col.explode().drop_nulls().to_numpy().astype(np.int64)
    if len(values) != lengths.sum():
        raise DataError("list column has null entries", file=S.FILES["sequences"], column=col.name)
    return values, np.concatenate([[0], np.cumsum(lengths)])


def _gather_hist(values: np.ndarray, start: np.ndarray, end: np.ndarray, h: int) -> np.ndarray:
    """(N, h) right-aligned windows values[max(start, end - h) : end], -1 padded."""
    cols = np.arange(h)
    idx = end[:, None] - h + cols[None, :]  # (N, h)
    valid = idx >= start[:, None]
    safe = np.clip(idx, 0, max(len(values) - 1, 0))
    return np.where(valid, values[safe] if len(values) else -1, -1)


def _segment_any(flags: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    seg = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
    return np.bincount(seg, weights=flags.astype(np.float64), minlength=len(offsets) - 1) > 0


def prepare_cold_start(
    interactions: pl.DataFrame,
    sequences: pl.DataFrame,
    items: pl.DataFrame,
    *,
    holdout_frac: float = 0.2,
    seed: int = 0,
    history_len: int = 50,
) -> ColdStartData:
    """Hold out items and build train pairs/sequences and valid/test impressions."""
    items = items.sort(S.ITEM_ID)
    item_ids = items[S.ITEM_ID].to_numpy().astype(np.int64)
    seqs = sequences.sort(S.USER_ID)
    user_ids = seqs[S.USER_ID].to_numpy().astype(np.int64)
    n_items = len(item_ids)

    has_train = items[S.N_TRAIN].fill_null(0).to_numpy() > 0
    eligible = np.flatnonzero(has_train)
    rng = np.random.default_rng(seed)
    n_hold = int(round(holdout_frac * len(eligible)))
    heldout = np.zeros(n_items, dtype=bool)
    heldout[rng.choice(eligible, n_hold, replace=False)] = True
    warm = has_train & ~heldout

    pos_vals, pos_off = _flatten(seqs[S.POS_ITEM_IDS])
    all_vals, all_off = _flatten(seqs[S.ITEM_IDS])
    pos_vals = _dense(pos_vals, item_ids, S.ITEM_ID, S.FILES["sequences"])
    all_vals = _dense(all_vals, item_ids, S.ITEM_ID, S.FILES["sequences"])

    cols = [S.USER_ID, S.ITEM_ID, S.SPLIT, S.POS_HIST_END, S.POS_HIST_LEN, S.HIST_END]
    pos = interactions.filter(pl.col(S.LABEL) == 1).select(cols)
    users_all = _dense(pos[S.USER_ID].to_numpy().astype(np.int64), user_ids, S.USER_ID, S.FILES["interactions"])
    items_all = _dense(pos[S.ITEM_ID].to_numpy().astype(np.int64), item_ids, S.ITEM_ID, S.FILES["interactions"])
    split = pos[S.SPLIT].to_numpy()
    pe = pos[S.POS_HIST_END].to_numpy().astype(np.int64)
    plen = pos[S.POS_HIST_LEN].to_numpy().astype(np.int64)
    he = pos[S.HIST_END].to_numpy().astype(np.int64)

    # --- train: positives of non-held-out items; histories without held-out items
    tr = (split == "train") & ~heldout[items_all]
    known = np.zeros(n_items, dtype=bool)
    known[items_all[tr]] = True
    tr_idx = np.flatnonzero(tr)
    by_user = tr_idx[np.argsort(users_all[tr_idx], kind="stable")]  # time order within a user
    tu, ti = users_all[by_user], items_all[by_user]
    bounds = np.flatnonzero(np.diff(tu)) + 1
    train_sequences = [s for s in np.split(ti, bounds) if len(s)]
    keep = ~heldout[pos_vals]
    ck = np.concatenate([[0], np.cumsum(keep)])  # exclusive prefix count of kept positives
    f_vals, f_off = pos_vals[keep], ck[pos_off]
    u_tr = users_all[tr_idx]
    f_end_abs = ck[pos_off[u_tr] + pe[tr_idx]]  # position in f_vals after the history
    has_hist = f_end_abs > f_off[u_tr]
    t_sel = tr_idx[has_hist]
    train = Impressions(
        users=users_all[t_sel],
        targets=items_all[t_sel],
        hist=_gather_hist(f_vals, f_off[users_all[t_sel]], f_end_abs[has_hist], history_len),
        cold=np.zeros(len(t_sel), dtype=bool),
    )

    counts: dict[str, int] = {
        "n_items": n_items,
        "n_items_heldout": int(heldout.sum()),
        "n_items_warm": int(warm.sum()),
        "n_items_cold": int((~warm).sum()),
        "n_items_known": int(known.sum()),
        "n_train_pairs": len(tu),
        "n_train_examples": len(t_sel),
    }
    splits = {}
    for name in ("valid", "test"):
        sel = np.flatnonzero(split == name)
        u, t = users_all[sel], items_all[sel]
        hist = _gather_hist(pos_vals, pos_off[u] + pe[sel] - plen[sel], pos_off[u] + pe[sel], history_len)
        ex_len = he[sel]
        ex_off = np.concatenate([[0], np.cumsum(ex_len)])
        ex_start = np.repeat(all_off[u] - ex_off[:-1], ex_len)
        ex_vals = all_vals[ex_start + np.arange(ex_off[-1])] if ex_off[-1] else np.zeros(0, np.int64)
        repeat = _segment_any(ex_vals == np.repeat(t, ex_len), ex_off)
        no_hist = pe[sel] == 0
        ok = ~repeat & ~no_hist
        counts[f"n_{name}_skipped_no_history"] = int(no_hist.sum())
        counts[f"n_{name}_skipped_repeat"] = int((repeat & ~no_hist).sum())
        # re-pack the exclusion lists of the kept impressions
        imps = Impressions(
            users=u[ok],
            targets=t[ok],
            hist=hist[ok],
            cold=~warm[t[ok]],
            exclude_offsets=np.concatenate([[0], np.cumsum(ex_len[ok])]),
            exclude_values=ex_vals[np.repeat(ok, ex_len)],
        )
        counts[f"n_{name}_warm"] = int((~imps.cold).sum())
        counts[f"n_{name}_cold"] = int(imps.cold.sum())
        splits[name] = imps
    if len(tu) == 0:
        raise DataError("no train positives left after holding out items", file=S.FILES["interactions"], column=S.LABEL)
    return ColdStartData(
        item_ids=item_ids,
        user_ids=user_ids,
        heldout=heldout,
        warm=warm,
        known=known,
        train_users=users_all[by_user],
        train_items=items_all[by_user],
        train_sequences=train_sequences,
        train=train,
        valid=splits["valid"],
        test=splits["test"],
        counts=counts,
    )


__all__ = ["Impressions", "ColdStartData", "prepare_cold_start"]
