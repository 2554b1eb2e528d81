"""Synthetic sources, deterministic by seed (`SyntheticConfig.kind`):

    uniform    planted low-rank preferences with popularity skew, short
               histories (`generate_synthetic`; the debug config's data)
    interests  long histories with planted interests that recur sparsely
               across the whole history (`generate_interests`; the
               long-history experiment's data)

Both return a `RawSource` (lazy frames, fingerprinted by their config) and
the planted truth. `features.sources` re-exports every public name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
import polars as pl

from features import schemas as S
from features.core.config import config_hash, need, to_dict

if TYPE_CHECKING:
    from features.sources import RawSource

# Words that name the planted factor directions in item text: the text encoder
# sees real English words, so text similarity tracks factor similarity.
_WORDS = (
    "river mountain forest desert ocean city village castle robot dragon detective "
    "pirate wizard soldier doctor teacher racing cooking music dance space alien "
    "love war crime family friendship revenge mystery comedy horror history "
    "science magic sport travel winter summer night morning ghost zombie spy king "
    "queen school prison island jungle train ship garden storm fire ice gold "
    "machine animal monster hero"
).split()


# SyntheticConfig keys of kind "uniform": its fingerprint hashes only these,
# so data made before `kind` existed keeps its fingerprint.
T0 = 883_612_800  # 1998-01-01 UTC: the first timestamp
MAX_DAYS = 73_000  # T0 + 73_000 days is in 2197 (timeunits.MAX_TS_S: 2200-01-01)
_UNIFORM_KEYS = ("users", "items", "max_events", "min_events", "rank", "days", "popularity_exponent",
                 "preference_strength", "seed")


@dataclass(frozen=True)
class SyntheticConfig:
    """Deterministic by seed. kind "uniform": planted low-rank preferences with
    popularity skew (`generate_synthetic`); kind "interests": long histories
    with planted interests that recur sparsely (`generate_interests`)."""

    kind: Literal["uniform", "interests"] = "uniform"  # uniform: low-rank preferences, short histories; interests: planted interests over long histories (keys marked interests)
    users: int = 1000  # number of users
    items: int = 2000  # number of items
    max_events: int = 200  # longest per-user event sequence
    min_events: int = 0  # shortest; 0 means max(5, max_events // 10) (uniform) or max_events (interests; drawn: an item repeated within a session is dropped, the build says how many)
    rank: int = 16  # uniform: planted factor dimension
    days: int = 120  # time span of the data
    popularity_exponent: float = 1.0  # uniform: Zipf exponent of item popularity
    preference_strength: float = 2.0  # uniform: weight of user . item in the choice logits
    topics: int = 32  # interests: item topics (items split evenly among them at random)
    interests: int = 4  # interests: planted interest topics per user (label 1 = the item's topic is one of them)
    interest_share: float = 0.1  # interests: share of a user's drawn events from their interests (the rest: uniform over all items; repeats dropped, mostly interest events)
    session_focus: float = 0.4  # interests: share of an interest session's events drawn from its one interest; interest sessions, spread evenly over the history, are interest_share / session_focus of all sessions
    session_size: int = 50  # interests: events drawn per session (repeats dropped); a session's events share one timestamp (one request)
    label_noise: float = 0.05  # interests: probability that a label is flipped from the planted truth
    seed: int = 0  # generator seed (same seed, same data)

    def __post_init__(self) -> None:
        need(self, ("users",), lambda v: v >= 1, ">= 1")
        need(self, ("items",), lambda v: v >= 2, ">= 2")
        need(self, ("max_events",), lambda v: v >= 1, ">= 1")
        if self.min_events < 0 or self.min_events > self.max_events:
            raise ValueError(f"need 0 <= min_events <= max_events, got min_events {self.min_events}, "
                             f"max_events {self.max_events}")
        need(self, ("rank",), lambda v: 1 <= v <= len(_WORDS) // 2, f"in 1..{len(_WORDS) // 2}")
        # the data starts on 1998-01-01 and must end before 2200, the latest date the build reads
        need(self, ("days",), lambda v: 2 <= v <= MAX_DAYS, f"in 2..{MAX_DAYS} (the data starts in 1998 and must end before 2200)")
        need(self, ("popularity_exponent", "preference_strength"), lambda v: v >= 0, ">= 0")
        if self.kind == "interests":
            self._check_interests()

    def _check_interests(self) -> None:
        if not 1 <= self.interests < self.topics <= self.items:
            raise ValueError(f"kind interests: need 1 <= interests < topics <= items, got interests {self.interests}, "
                             f"topics {self.topics}, items {self.items}")
        if not 0.0 <= self.interest_share <= self.session_focus <= 1.0 or self.session_focus == 0:
            raise ValueError("kind interests: need 0 <= interest_share <= session_focus <= 1, session_focus > 0, got "
                             f"interest_share {self.interest_share}, session_focus {self.session_focus}")
        if not 0.0 <= self.label_noise < 0.5:
            raise ValueError(f"kind interests: need 0 <= label_noise < 0.5, got {self.label_noise}")
        if self.session_size < 1:
            raise ValueError(f"kind interests: session_size must be >= 1, got {self.session_size}")
        if -(-self.max_events // self.session_size) > self.days * 1440:
            raise ValueError(f"kind interests: more sessions than minutes in `days` ({self.days}); raise days or "
                             f"session_size ({self.session_size})")


def generate_synthetic(cfg: SyntheticConfig) -> tuple[RawSource, pl.DataFrame]:
    """Return the raw source and the planted truth (kind "uniform": item
    factors; kind "interests": see `generate_interests`).

    Users pick items with probability proportional to popularity_i *
    exp(strength * u . v_i); they like (rating >= 4) items whose affinity is
    high. Timestamps come in sessions (bursts within a day) over `days` days.
    """
    if cfg.kind == "interests":
        return generate_interests(cfg)
    rng = np.random.default_rng(cfg.seed)
    k = cfg.rank
    item_f = rng.standard_normal((cfg.items, k)) / np.sqrt(k)  # (I, k)
    user_f = rng.standard_normal((cfg.users, k)) / np.sqrt(k)  # (U, k)
    pop_rank = rng.permutation(cfg.items)
    log_pop = -cfg.popularity_exponent * np.log1p(pop_rank)  # (I,)
    lo = cfg.min_events or max(1, min(5, cfg.max_events), cfg.max_events // 10)
    lengths = np.exp(rng.uniform(np.log(lo), np.log(cfg.max_events + 1), cfg.users)).astype(np.int64)
    lengths = np.clip(lengths, lo, cfg.max_events)

    users_col, items_col, ts_col, rating_col = [], [], [], []
    t0 = T0
    span = cfg.days * 86400
    for u in range(cfg.users):
        n = int(lengths[u])
        aff = item_f @ user_f[u]  # (I,)
        logits = log_pop + cfg.preference_strength * aff * np.sqrt(k)
        p = np.exp(logits - logits.max())
        cdf = np.cumsum(p)
        chosen = np.searchsorted(cdf, rng.random(n) * cdf[-1])  # (n,)
        chosen = np.minimum(chosen, cfg.items - 1)
        # sessions: a few active days per user, several events per session
        start = rng.integers(0, span // 2)
        active = rng.uniform(0.3, 1.0) * (span - start)
        sessions = max(1, n // int(rng.integers(3, 30)))
        sess_t = np.sort(start + rng.random(sessions) * active)
        ts = sess_t[rng.integers(0, sessions, n)] + rng.integers(0, 3600, n)
        score = aff[chosen] * np.sqrt(k) + 0.5 * rng.standard_normal(n)
        # Chosen items already have high affinity: rate relative to the user's
        # own median so about half the events are positives.
        rating = np.clip(np.round(3.5 + 1.5 * (score - np.median(score))), 1, 5)
        users_col.append(np.full(n, u, dtype=np.int64))
        items_col.append(chosen.astype(np.int64))
        ts_col.append((t0 + ts).astype(np.int64))
        rating_col.append(rating)
    inter = pl.DataFrame(
        {
            S.USER_ID: np.concatenate(users_col),
            S.ITEM_ID: np.concatenate(items_col),
            S.TIMESTAMP: np.concatenate(ts_col),
            S.RATING: np.concatenate(rating_col).astype(np.float64),
        }
    )
    # The same user may draw the same item twice in one second: keep one.
    inter = inter.unique(subset=[S.USER_ID, S.ITEM_ID, S.TIMESTAMP], keep="first", maintain_order=True)

    top = np.argsort(-np.abs(item_f), axis=1)[:, :3]  # (I, 3) strongest directions
    sign = np.take_along_axis(item_f, top, axis=1) > 0
    word_idx = top * 2 + sign  # each direction has a word per sign
    words = np.array(_WORDS)
    texts = [f"A story of {words[a]}, {words[b]} and {words[c]}." for a, b, c in word_idx]
    category = [f"c{d}{'+' if s else '-'}" for d, s in zip(top[:, 0], sign[:, 0])]
    tags = [[f"t{d}" for d in np.flatnonzero(row > 0.5)] for row in item_f * np.sqrt(k)]
    items = pl.DataFrame(
        {
            S.ITEM_ID: np.arange(cfg.items, dtype=np.int64),
            S.TEXT: texts,
            "category": category,
            "tags": pl.Series(tags, dtype=pl.List(pl.String)),
            "popularity_rank": pop_rank.astype(np.int32),
        }
    )
    users = pl.DataFrame(
        {
            S.USER_ID: np.arange(cfg.users, dtype=np.int64),
            "segment": [f"s{d}" for d in np.argmax(user_f, axis=1)],
        }
    )
    truth = pl.DataFrame(
        {
            S.ITEM_ID: np.arange(cfg.items, dtype=np.int64),
            "factor": pl.Series(item_f.astype(np.float32).tolist(), dtype=pl.List(pl.Float32)),
        }
    )
    from features.sources import RawSource, RawTable  # sources re-exports this module: import at call time

    name = f"synthetic(seed={cfg.seed})"
    # Deterministic by config: the config hash is the content fingerprint.
    fp = "synthetic-v1-" + config_hash({k: v for k, v in to_dict(cfg).items() if k in _UNIFORM_KEYS})
    source = RawSource(
        name="synthetic",
        interactions=RawTable(inter.lazy(), name + "/interactions", fp + "-inter"),
        items=RawTable(items.lazy(), name + "/items", fp + "-items"),
        users=RawTable(users.lazy(), name + "/users", fp + "-users"),
    )
    return source, truth


def generate_interests(cfg: SyntheticConfig) -> tuple[RawSource, pl.DataFrame]:
    """Long histories whose planted signal lies mostly far from their end.

    Items are split evenly among `topics` topics (a random assignment). Each
    user has `interests` distinct interest topics and n events (n uniform in
    [min_events or max_events, max_events]) in sessions of `session_size`
    events spread evenly over `days` (one timestamp per session: a session is
    one request with its events as candidates). A session is, with
    probability interest_share / session_focus, an interest session devoted
    to one of the user's interests (uniform), in which each event is, with
    probability `session_focus`, an item of that interest's topic; every
    other event is an item uniform over the catalogue. Interest sessions are
    drawn independently, so each interest recurs sparsely (in bursts) across
    the whole history: the last 256 of ~10,000 events hold ~2.7% of its
    evidence, and usually show at most one or two of a user's interests.
    label = 1 when the item's topic is one of the user's interests, flipped
    with probability `label_noise`: candidates come from all interests (and
    from none), whichever the recent sessions showed.

    Returns the raw source (interactions with a `label` column, no rating;
    items with a text naming the topic; no users table) and the planted
    truth: one row per user with `interests` (topic ids), one per item with
    `topic` (columns user_id / item_id, the other null).
    """
    rng = np.random.default_rng(cfg.seed)
    topic_of = rng.permutation(cfg.items) % cfg.topics  # (I,) item -> topic, balanced
    members = [np.flatnonzero(topic_of == t) for t in range(cfg.topics)]
    lo = cfg.min_events or cfg.max_events
    lengths = rng.integers(lo, cfg.max_events + 1, cfg.users)  # (U,)
    span = cfg.days * 86400
    t0 = T0
    users_col, items_col, ts_col, label_col, interests = [], [], [], [], []
    for u in range(cfg.users):
        n = int(lengths[u])
        mine = np.sort(rng.choice(cfg.topics, cfg.interests, replace=False))  # (K,)
        interests.append(mine)
        sessions = -(-n // cfg.session_size)
        session = np.arange(n) // cfg.session_size  # (n,)
        # interest sessions: each devoted to one interest, drawn independently of the others
        focused = rng.random(sessions) < cfg.interest_share / cfg.session_focus  # (sessions,)
        which = mine[rng.integers(0, cfg.interests, sessions)]  # (sessions,) its interest
        planted = focused[session] & (rng.random(n) < cfg.session_focus)  # (n,)
        items = rng.integers(0, cfg.items, n)  # (n,) uniform background
        items[planted] = [members[t][rng.integers(0, len(members[t]))] for t in which[session[planted]]]
        truth = np.isin(topic_of[items], mine)  # (n,)
        flip = rng.random(n) < cfg.label_noise
        # distinct session minutes, spread evenly over the span (sorted: oldest first)
        minutes = np.sort(rng.choice(span // 60, sessions, replace=False))
        ts = t0 + 60 * np.repeat(minutes, cfg.session_size)[:n]  # (n,)
        users_col.append(np.full(n, u, dtype=np.int64))
        items_col.append(items.astype(np.int64))
        ts_col.append(ts.astype(np.int64))
        label_col.append((truth ^ flip).astype(np.int8))
    inter = pl.DataFrame(
        {
            S.USER_ID: np.concatenate(users_col),
            S.ITEM_ID: np.concatenate(items_col),
            S.TIMESTAMP: np.concatenate(ts_col),
            S.LABEL: np.concatenate(label_col),
        }
    )
    # An item drawn twice in one session would be an exact duplicate: keep one
    # (about 8% of the events of experiments/configs/long_history.yaml, most
    # of them in interest sessions, whose topic has few items). So the kept
    # events are fewer than drawn: a user may end below min_events, a session
    # below session_size, and the kept share of interest events below
    # interest_share. The build says by how much (`RawSource.notes`).
    drawn = inter.height
    inter = inter.unique(subset=[S.USER_ID, S.ITEM_ID, S.TIMESTAMP], keep="first", maintain_order=True)
    notes = ()
    if inter.height < drawn:
        per_user = inter.group_by(S.USER_ID).len()["len"]
        notes = (f"synthetic interests: {drawn - inter.height:,} of {drawn:,} drawn events ({(drawn - inter.height) / drawn:.1%}) "
                 f"repeated an item within its session and were dropped: kept events per user {per_user.min():,}-"
                 f"{per_user.max():,} (drawn: {lo:,}-{cfg.max_events:,}): min_events, session_size and interest_share "
                 "bound what is drawn, not what is kept (more items per topic drop fewer)",)
    words = np.array(_WORDS)
    items = pl.DataFrame(
        {
            S.ITEM_ID: np.arange(cfg.items, dtype=np.int64),
            S.TEXT: [f"A story of {words[t % len(words)]} (topic {t})." for t in topic_of],
        }
    )
    truth = pl.concat(
        [
            pl.DataFrame({S.USER_ID: np.arange(cfg.users, dtype=np.int64),
                          "interests": pl.Series([m.tolist() for m in interests], dtype=pl.List(pl.Int64))}),
            pl.DataFrame({S.ITEM_ID: np.arange(cfg.items, dtype=np.int64), "topic": topic_of.astype(np.int64)}),
        ],
        how="diagonal",
    )
    from features.sources import RawSource, RawTable  # sources re-exports this module: import at call time

    name = f"synthetic-interests(seed={cfg.seed})"
    fp = "synthetic-interests-v1-" + config_hash(cfg)
    source = RawSource(
        name="synthetic",
        interactions=RawTable(inter.lazy(), name + "/interactions", fp + "-inter"),
        items=RawTable(items.lazy(), name + "/items", fp + "-items"),
        notes=notes,
    )
    return source, truth
