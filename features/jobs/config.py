"""Feature-build settings (pipeline config section `features`). Light: no
torch, no I/O."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from features import schemas as S
from features.core.config import expand_home, need, to_dict
from features.sources import SyntheticConfig
from features.spark.config import Engine, SparkConfig

JOB = "features.build"
JOB_VERSION = 3  # bump when the output of the same inputs and config changes
_INT32_MAX = 2**31 - 1  # hist_len and pos_hist_len are Int32 columns


SourceName = Literal["movielens100k", "movielens1m", "files", "synthetic"]
TimestampUnit = Literal["s", "ms", "us", "ns"]

# Where a calendar day starts, per source, when `day_offset_s` is not set.
# MovieLens-100K is US data: a UTC day splits the evening sessions of US users
# at UTC midnight (12% of its next-day returns are one session crossing it).
# Its days start at 04:00 US Central (10:00 UTC), next to the activity trough
# of the data (11:00 UTC): a session rarely crosses that boundary. MovieLens-1M
# has the same trough (11:00 UTC): the same offset (next-day returns 0.193 at
# UTC days, 0.177 at this offset).
DEFAULT_DAY_OFFSET_S: dict[str, int] = {
    "movielens100k": -10 * 3600,
    "movielens1m": -10 * 3600,
    "files": 0,
    "synthetic": 0,
}


@dataclass(frozen=True)
class FeaturesConfig:
    """How raw interactions become training data (every key documented in
    experiments/configs/base.yaml, section `features`)."""

    source: SourceName = "movielens100k"  # input: movielens100k | movielens1m (installed packages) | files | synthetic
    interactions: str | None = None  # files source: interactions parquet/CSV
    items: str | None = None  # files source: optional items parquet/CSV
    text_column: str = S.TEXT  # files source: the items column holding text
    multi_value_sep: str | None = "|"  # files source: an items text-typed column with values holding this separator is a multi-valued field (genres "Action|Comedy" -> [Action, Comedy]); null: each such column is one category per distinct string
    timestamp_unit: TimestampUnit = "s"  # files source: unit of the timestamp column (converted to seconds on read)
    label_threshold: float = 4.0  # label = rating >= threshold (if no label column)
    split: Literal["global_time", "leave_last_out"] = "global_time"  # global time cut by event count, or last events per user
    valid_frac: float = 0.1  # global_time: share of events (by count) in valid
    test_frac: float = 0.1  # global_time: share of events (by count) in test (> 0)
    history_cap: int = 10_000  # hist_len = min(events strictly earlier, history_cap): the longest history an impression records
    day_offset_s: int | None = None  # calendar days start at local midnight, local time = UTC + offset (-36000: days start at 10:00 UTC); null: the source's default (movielens100k and movielens1m -36000, else 0)
    on_duplicate: Literal["drop", "error"] = "drop"  # exact duplicate rows
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)  # synthetic source: generator settings
    engine: Engine = "polars"  # polars (one process) or spark (the same per-user code in Spark tasks); identical outputs, so not part of the manifest key
    spark: SparkConfig = field(default_factory=SparkConfig)  # engine spark: master URL, partitions, UI, log level

    def __post_init__(self) -> None:
        if not math.isfinite(self.label_threshold):
            raise ValueError(f"label_threshold must be a finite number, got {self.label_threshold}")
        if not (0 <= self.valid_frac < 1 and 0 <= self.test_frac < 1 and self.valid_frac + self.test_frac < 1):
            raise ValueError("valid_frac and test_frac must be in [0, 1) and sum to less than 1, got "
                             f"valid_frac {self.valid_frac}, test_frac {self.test_frac}")
        if self.split == "global_time" and self.test_frac == 0:
            # with no test share the later rows would still be called "test"
            raise ValueError("test_frac must be > 0 for split global_time (there is no split without a test part)")
        need(self, ("history_cap",), lambda v: 1 <= v <= _INT32_MAX, f"in 1..{_INT32_MAX}")  # hist_len is Int32
        expand_home(self, ("interactions", "items"))
        if self.day_offset_s is not None and not -86_400 < self.day_offset_s < 86_400:
            raise ValueError(f"day_offset_s must be within one day (-86400, 86400), got {self.day_offset_s}")
        if self.source == "files" and not self.interactions:
            raise ValueError("source 'files' needs `interactions` (--interactions PATH)")
        if self.multi_value_sep is not None and (not isinstance(self.multi_value_sep, str) or not self.multi_value_sep.strip()):
            raise ValueError(f"multi_value_sep must be a non-blank string or null, got {self.multi_value_sep!r}")
        if self.source != "files":
            for key in ("interactions", "items"):
                if getattr(self, key) is not None:
                    raise ValueError(f"{key} applies to the files source only (source {self.source!r} reads its own data); "
                                     "set source: files to read your files")
        if self.source != "files" and self.text_column != S.TEXT:
            raise ValueError(f"text_column applies to the files source only (source {self.source!r} names its own text)")
        if self.source != "synthetic" and self.synthetic != SyntheticConfig():
            raise ValueError(f"synthetic (--users, --n-items, --max-events, --seed) applies to the synthetic source only; "
                             f"source {self.source!r} reads its own data")
        if self.source != "files" and self.timestamp_unit != "s":
            raise ValueError(f"timestamp_unit applies to the files source only (source {self.source!r} is in seconds)")

    @property
    def day_offset(self) -> int:
        """The day offset in use: `day_offset_s`, else the source's default."""
        return DEFAULT_DAY_OFFSET_S[self.source] if self.day_offset_s is None else self.day_offset_s

    def relevant(self) -> dict[str, Any]:
        """The keys that affect the output (source-specific keys of other sources dropped)."""
        d = to_dict(self) | {"day_offset_s": self.day_offset}
        # the engine only decides where the same code runs: a folder built by
        # either engine is up to date for the other
        d.pop("engine")
        d.pop("spark")
        if self.source != "synthetic":
            d.pop("synthetic")
        if self.source != "files":
            for k in ("interactions", "items", "text_column", "timestamp_unit", "multi_value_sep"):
                d.pop(k)
        return d

