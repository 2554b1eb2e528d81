"""Cold-start protocol (`prepare_cold_start`), which never peeks at test:

- Two disjoint item sets are drawn (`np.random.default_rng(seed)`) among the
  items that have train events:
  * test-cold (`heldout`, share `holdout_frac`, default 0.2): reported as
    cold on test, scored once at the end;
  * pseudo-cold (`pseudo_cold`, share `pseudo_cold_frac`, default 0.1): the
    cold half of the VALID split, which drives every choice (early stopping,
    model selection).
  ALL interactions of both sets are removed from teacher and student
  training (targets, histories, item pairs, teacher tables).
- warm item = has train events and is in neither set. Teachers "know" the
  warm items with >= 1 train positive (`known`).
- valid impressions: the valid period's positives; warm targets = warm
  items, cold targets = pseudo-cold items. Valid-period positives of
  test-cold items are dropped. (The pseudo-cold items' train-period
  positives are unseen too, and ten times as many, but they are in-sample in
  time: on ML-100K they ranked a residual student above the plain one while
  the valid period and the test period both ranked it below. Choices are
  made out of time, as the test is.)
- test impressions: warm targets as above; cold targets = test-period
  positives of test-cold items and of items without any train event.
  Test-period positives of pseudo-cold items are dropped: they informed
  the choices, so they are not reported as cold.
- Users' query histories are their real, strictly earlier positives (any
  item, hidden ones included: the student embeds them from content).

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
    heldout: np.ndarray  # (I,) bool: test-cold items held out of training
    pseudo_cold: np.ndarray  # (I,) bool: valid-cold items held out of training (disjoint from heldout)
    warm: np.ndarray  # (I,) bool: has train events and in neither held-out set
    known: np.ndarray  # (I,) bool: warm with >= 1 train positive (teachers learn these)
    train_users: np.ndarray  # (P,) train positives minus both held-out sets ...
    train_items: np.ndarray  # (P,) ... in time order
    train_sequences: list[np.ndarray]  # per user with train positives, item indices in time order
    train: Impressions  # train positives with a (held-out-free) earlier positive history
    valid: Impressions
    test: Impressions
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def hidden(self) -> np.ndarray:
        """(I,) bool: items whose interactions no model may train on."""
        return self.heldout | self.pseudo_cold

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


def draw_cold_items(has_train: np.ndarray, holdout_frac: float, pseudo_cold_frac: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(heldout, pseudo_cold): two disjoint (I,) bool masks over the items with
    train events, shares `holdout_frac` and `pseudo_cold_frac` of them, seeded."""
    eligible = np.flatnonzero(has_train)
    perm = np.random.default_rng(seed).permutation(eligible)
    n_hold = int(round(holdout_frac * len(eligible)))
    n_pseudo = int(round(pseudo_cold_frac * len(eligible)))
    heldout = np.zeros(len(has_train), dtype=bool)
    pseudo = np.zeros(len(has_train), dtype=bool)
    heldout[perm[:n_hold]] = True
    pseudo[perm[n_hold : n_hold + n_pseudo]] = True
    return heldout, pseudo


def prepare_cold_start(
    interactions: pl.DataFrame,
    sequences: pl.DataFrame,
    items: pl.DataFrame,
    *,
    holdout_frac: float = 0.2,
    pseudo_cold_frac: float = 0.1,
    seed: int = 0,
    history_len: int = 50,
) -> ColdStartData:
    """Hold out test-cold and pseudo-cold items; build train pairs/sequences
    and valid/test impressions (see the module docstring)."""
    if holdout_frac + pseudo_cold_frac >= 1:
        raise ValueError("holdout_frac + pseudo_cold_frac must be < 1")
    items = items.sort(S.ITEM_ID)
    item_ids = items[S.ITEM_ID].to_numpy().astype(np.int64)
    seqs = sequences.sort(S.USER_ID)
    user_ids = seqs[S.USER_ID].to_numpy().astype(np.int64)
    n_items = len(item_ids)

    has_train = items[S.N_TRAIN].fill_null(0).to_numpy() > 0
    heldout, pseudo = draw_cold_items(has_train, holdout_frac, pseudo_cold_frac, seed)
    hidden = heldout | pseudo
    warm = has_train & ~hidden
    test_cold = ~warm & ~pseudo  # held out for test, or no train event at all

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

    # --- train: positives of visible items; histories without hidden items
    tr = (split == "train") & ~hidden[items_all]
    known = np.zeros(n_items, dtype=bool)
    known[items_all[tr]] = True
    tr_idx = np.flatnonzero(tr)
    by_user = tr_idx[np.argsort(users_all[tr_idx], kind="stable")]  # time order within a user
    tu, ti = users_all[by_user], items_all[by_user]
    bounds = np.flatnonzero(np.diff(tu)) + 1
    train_sequences = [s for s in np.split(ti, bounds) if len(s)]
    keep = ~hidden[pos_vals]
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
        "n_items_pseudo_cold": int(pseudo.sum()),
        "n_items_warm": int(warm.sum()),
        "n_items_cold": int(test_cold.sum()),
        "n_items_known": int(known.sum()),
        "n_train_pairs": len(tu),
        "n_train_examples": len(t_sel),
    }

    def impressions(name: str, sel: np.ndarray, cold_items: np.ndarray) -> Impressions:
        """Positives `sel` (indices into pos) whose target is warm or in
        `cold_items`, with their histories and exclusion lists."""
        u, t = users_all[sel], items_all[sel]
        hist = _gather_hist(pos_vals, pos_off[u] + pe[sel] - plen[sel], pos_off[u] + pe[sel], history_len)
        ex_len = he[sel]
        ex_off = np.concatenate([[0], np.cumsum(ex_len)])
        ex_start = np.repeat(all_off[u] - ex_off[:-1], ex_len)
        ex_vals = all_vals[ex_start + np.arange(ex_off[-1])] if ex_off[-1] else np.zeros(0, np.int64)
        repeat = _segment_any(ex_vals == np.repeat(t, ex_len), ex_off)
        no_hist = pe[sel] == 0
        other = ~(warm[t] | cold_items[t])  # the other split's cold items
        ok = ~repeat & ~no_hist & ~other
        counts[f"n_{name}_skipped_no_history"] = int(no_hist.sum())
        counts[f"n_{name}_skipped_repeat"] = int((repeat & ~no_hist).sum())
        counts[f"n_{name}_skipped_other_cold"] = int((other & ~repeat & ~no_hist).sum())
        imps = Impressions(
            users=u[ok],
            targets=t[ok],
            hist=hist[ok],
            cold=cold_items[t[ok]],
            exclude_offsets=np.concatenate([[0], np.cumsum(ex_len[ok])]),
            exclude_values=ex_vals[np.repeat(ok, ex_len)],
        )
        counts[f"n_{name}_warm"] = int((~imps.cold).sum())
        counts[f"n_{name}_cold"] = int(imps.cold.sum())
        return imps

    valid = impressions("valid", np.flatnonzero(split == "valid"), pseudo)
    test = impressions("test", np.flatnonzero(split == "test"), test_cold)
    if len(tu) == 0:
        raise DataError("no train positives left after holding out items", file=S.FILES["interactions"], column=S.LABEL)
    return ColdStartData(
        item_ids=item_ids,
        user_ids=user_ids,
        heldout=heldout,
        pseudo_cold=pseudo,
        warm=warm,
        known=known,
        train_users=users_all[by_user],
        train_items=items_all[by_user],
        train_sequences=train_sequences,
        train=train,
        valid=valid,
        test=test,
        counts=counts,
    )


__all__ = ["Impressions", "ColdStartData", "draw_cold_items", "prepare_cold_start"]
