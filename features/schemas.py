"""Column names and polars schemas: the one source of truth for every job.

Artifacts written by `recsys features build` into an output directory:

    interactions.parquet   one row per impression (event), in stable order
    sequences.parquet      one row per user: the user's whole event sequence
    items.parquet          one row per item: text, categorical/numeric fields
    users.parquet          one row per user (only when the source has user fields)
    manifest.json          schema, rows, fingerprints, config hash

and by `recsys features match` into its own output directory:

    match_features.parquet one row per impression (interactions order): the
                           key columns (user_id, item_id, timestamp) and the
                           match features, each named with the `mf_` prefix

Histories are jagged and stored once per user: the history of an impression is
`sequences.item_ids[hist_end - hist_len : hist_end]` of its user (all events
strictly earlier in time, capped at `features.history_cap`), and its positive history is
`sequences.pos_item_ids[pos_hist_end - pos_hist_len : pos_hist_end]`.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

# --- raw input (sources) -----------------------------------------------------
USER_ID = "user_id"
ITEM_ID = "item_id"
TIMESTAMP = "timestamp"  # unix seconds (inputs in ms/us/ns are converted: features.timestamp_unit)
RATING = "rating"
LABEL = "label"

# --- interactions.parquet ----------------------------------------------------
SPLIT = "split"
EVENT_IDX = "event_idx"  # position in global (timestamp, user_id, item_id) order
DAY = "day"  # floor((timestamp + day offset) / 86400); the offset defaults per source
HIST_END = "hist_end"  # user's events strictly earlier than this one
HIST_LEN = "hist_len"  # min(hist_end, history_cap)
POS_HIST_END = "pos_hist_end"  # user's positive events strictly earlier
POS_HIST_LEN = "pos_hist_len"  # min(pos_hist_end, history_cap)
ITEM_POP = "item_pop"  # events on this item (any user) strictly earlier
RETURNED_1D = "returned_1d"  # user has an event on day + 1
ACTIVE_DAYS_7 = "active_days_7"  # distinct days with an event in day+1 .. day+7
LT_OBSERVED = "lt_observed"  # day + 7 <= the last full day the row's split may see (its cutoff, or the data's end)
COLD_ITEM = "cold_item"  # the item's first event is after the train cutoff

SPLITS = ("train", "valid", "test")

INTERACTIONS_SCHEMA = pl.Schema(
    {
        USER_ID: pl.Int64,
        ITEM_ID: pl.Int64,
        TIMESTAMP: pl.Int64,
        RATING: pl.Float64,
        LABEL: pl.Int8,
        SPLIT: pl.String,
        EVENT_IDX: pl.Int64,
        DAY: pl.Int32,
        HIST_END: pl.Int32,
        HIST_LEN: pl.Int32,
        POS_HIST_END: pl.Int32,
        POS_HIST_LEN: pl.Int32,
        ITEM_POP: pl.Int32,
        RETURNED_1D: pl.Int8,
        ACTIVE_DAYS_7: pl.Int8,
        LT_OBSERVED: pl.Boolean,
        COLD_ITEM: pl.Boolean,
    }
)

# --- sequences.parquet -------------------------------------------------------
ITEM_IDS = "item_ids"
TIMESTAMPS = "timestamps"
LABELS = "labels"
POS_ITEM_IDS = "pos_item_ids"
POS_TIMESTAMPS = "pos_timestamps"

SEQUENCES_SCHEMA = pl.Schema(
    {
        USER_ID: pl.Int64,
        ITEM_IDS: pl.List(pl.Int64),
        TIMESTAMPS: pl.List(pl.Int64),
        LABELS: pl.List(pl.Int8),
        POS_ITEM_IDS: pl.List(pl.Int64),
        POS_TIMESTAMPS: pl.List(pl.Int64),
    }
)

# --- items.parquet -----------------------------------------------------------
TEXT = "text"  # the item's text for the text encoder
TITLE = "title"
GENRES = "genres"  # List(String), multi-valued categorical
YEAR = "year"
IMAGE_PATH = "image_path"  # optional: path to an image file
FIRST_TS = "first_ts"  # timestamp of the item's first event (null: never seen)
N_TRAIN = "n_train_events"

ITEMS_COMPUTED = (FIRST_TS, N_TRAIN, COLD_ITEM)  # item columns the build computes: an input column may not take these names

ITEMS_BASE_SCHEMA = pl.Schema(
    {
        ITEM_ID: pl.Int64,
        TEXT: pl.String,
        FIRST_TS: pl.Int64,
        N_TRAIN: pl.Int32,
        COLD_ITEM: pl.Boolean,
    }
)

# --- users.parquet (optional) ------------------------------------------------
USERS_BASE_SCHEMA = pl.Schema({USER_ID: pl.Int64})

# --- match_features.parquet (features.match) -----------------------------------
MATCH_FILE = "match_features.parquet"
# --- what every ranker run writes (recsys rank train, recsys baseline lightgbm) -------
PREDICTIONS_FILE = "predictions.parquet"  # one row per test impression: keys, label, score, lt_score, LT labels
METRICS_FILE = "metrics.json"  # test and valid metrics; null ones have their reason under "reasons"
MATCH_PREFIX = "mf_"  # every match-feature column starts with it
MATCH_KEYS = (USER_ID, ITEM_ID, TIMESTAMP)  # row keys, in interactions order


def match_file(location: str | Path) -> Path:
    """The match-features parquet of a location: a .parquet path as is, a
    folder written by `recsys features match` -> folder/match_features.parquet."""
    p = Path(location)
    return p if p.suffix == ".parquet" else p / MATCH_FILE


FILES = {
    "interactions": "interactions.parquet",
    "sequences": "sequences.parquet",
    "items": "items.parquet",
    "users": "users.parquet",
    "manifest": "manifest.json",
}


def text_columns(items: pl.Schema) -> list[str]:
    """The String columns of an items file but the id: the candidates `--text-column` is pointed at."""
    return [c for c, t in items.items() if t == pl.String and c != ITEM_ID]


def item_field_kinds(items: pl.Schema) -> dict[str, list[str]]:
    """Classify the extra item columns: categorical, multi-valued, numeric, image.

    Everything but the base columns is a content field the encoders may use:
    String -> categorical, List(String) -> multi-valued categorical,
    numeric -> numeric, `image_path` -> image.
    """
    kinds: dict[str, list[str]] = {"categorical": [], "multi": [], "numeric": [], "image": []}
    for name, dtype in items.items():
        if name in ITEMS_BASE_SCHEMA or name == TITLE:
            continue
        if name == IMAGE_PATH:
            kinds["image"].append(name)
        elif dtype == pl.String:
            kinds["categorical"].append(name)
        elif dtype == pl.List(pl.String):
            kinds["multi"].append(name)
        elif dtype.is_numeric():
            kinds["numeric"].append(name)
    return kinds
