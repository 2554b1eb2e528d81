"""Timestamp units: is an interactions file's time column plausible in the unit it is read in?

Units are multiples of one second; a timestamp (in seconds) may lie between
1980 and 2200. A value past 2200 is almost always a finer unit read as
seconds (milliseconds give year ~50000); the lower checks catch the reverse,
seconds read as a finer unit (everything within 1970-01), rows in another
unit or format beside calendar times (a 0 for a missing time, a date written
20200913, which reads as August 1970), and a whole column of dates written
YYYYMMDD. Relative times (all of them small, e.g. seconds since the start of
a log) pass: only their mix with calendar times is refused.
"""

from __future__ import annotations

import polars as pl

from features import schemas as S
from features.core.errors import DataError
from features.sources import RawTable

UNIT_PER_S = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}
UNIT_NAMES = {"s": "seconds", "ms": "milliseconds", "us": "microseconds", "ns": "nanoseconds"}
MAX_TS_S = 7_258_118_400  # 2200-01-01 UTC
YEAR_1980_S = 315_532_800  # no interaction log here starts earlier (MovieLens-100K: 1997)
JANUARY_1970_S = 31 * 86_400
_SHOW = 5  # rows shown per problem
# dates written as the integer YYYYMMDD, years 1900..2199
_YMD_LO, _YMD_HI = 19_000_101, 21_991_231


def _ymd(ts: pl.Expr) -> pl.Expr:
    """True where an integer reads as a calendar date written YYYYMMDD."""
    month, day = ts // 100 % 100, ts % 100
    return ts.is_between(_YMD_LO, _YMD_HI) & month.is_between(1, 12) & day.is_between(1, 31)


def check_timestamp_unit(typed: pl.LazyFrame, table: RawTable, bounds: tuple[int, int], unit: str, dated: bool,
                         row: str) -> None:
    """Refuse timestamps that are implausible in `unit`: after 2200; every one
    a date written YYYYMMDD; all of them before 1980 while a coarser unit puts
    the first percentile in 1980..2200; or some before 1980 beside a majority
    from 1980 on (some within January 1970 beside a minority from 1980 on). The
    message names the unit they look like when there is one. A `dated` column
    (a parquet datetime or date) has its own unit: no other unit is suggested.
    `typed` holds the parsed column and the 0-based input row in `row`."""
    lo, hi = bounds
    per_s = UNIT_PER_S[unit]
    ts = pl.col(S.TIMESTAMP)
    guess: str | None = None
    hint: str | None = None
    if not dated and _YMD_LO <= lo and hi <= _YMD_HI and typed.select(_ymd(ts).all()).collect().item():
        bad = pl.lit(True)
        what = "every timestamp reads as a date written YYYYMMDD"
        hint = "convert them to epoch times (seconds since 1970-01-01 UTC), or pass dates as a parquet date column"
    elif hi > MAX_TS_S * per_s:
        # a finer unit only when it fits the earliest time too: else a few rows are wrong, not the unit
        finer = [u for u, f in UNIT_PER_S.items() if f > per_s and hi <= MAX_TS_S * f and lo >= YEAR_1980_S * f]
        guess = finer[0] if finer and not dated else None
        bad = ts > MAX_TS_S * per_s
        what = "dates after the year 2200" if dated else f"timestamps after the year 2200 when read as {UNIT_NAMES[unit]}"
        hint = "fix or drop those rows (a placeholder such as 9999-12-31 for a missing date?)" if dated or (
            lo >= YEAR_1980_S * per_s) else None
    elif not dated and per_s > 1 and hi < YEAR_1980_S * per_s:
        # all before 1980 while a coarser unit makes the first percentile a date from 1980 on (an outlier row,
        # late or 0, let seconds read as milliseconds through: a probe, 2026-12-01; relative times start near 0)
        # zeros left out: a block of 0 placeholders (2% of rows) let them through
        low = typed.select(ts.filter(ts > 0).quantile(0.01, "lower")).collect().item() or 0
        coarser = [u for u, f in UNIT_PER_S.items() if f < per_s and YEAR_1980_S * f <= low <= MAX_TS_S * f]
        if not coarser:
            return
        guess = coarser[-1]
        bad = pl.lit(True)
        what = (f"every timestamp falls {'in January 1970' if hi < JANUARY_1970_S * per_s else 'before 1980'} when "
                f"read as {UNIT_NAMES[unit]}")
    elif lo < YEAR_1980_S * per_s <= hi:
        # rows before 1980 beside calendar times: with most rows from 1980 on, every earlier row is suspect (a
        # date written 20200913 reads as August 1970: a probe, 2026-12-01); with most before, only January 1970
        median = typed.select(ts.median()).collect().item()
        cut = YEAR_1980_S if median >= YEAR_1980_S * per_s else JANUARY_1970_S
        if lo >= cut * per_s:
            return
        bad = ts < cut * per_s
        when = "before 1980" if cut == YEAR_1980_S else "within January 1970"
        what = f"timestamps {when} when read as {UNIT_NAMES[unit]}, beside others from 1980 on"
        hint = ("fix or drop those rows (a row in another unit or format, such as a date written 20200913, or 0 "
                "written for a missing time?)")
        # most rows there, a coarser unit making them dates: the unit is wrong, not the few others
        most = typed.select((bad.sum() * 2 > pl.len()).alias("most"), ts.filter(bad).median().alias("mid")).collect().row(0)
        coarser = [u for u, f in UNIT_PER_S.items() if f < per_s and YEAR_1980_S * f <= (most[1] or 0) <= MAX_TS_S * f]
        guess = coarser[-1] if most[0] and coarser and not dated else None
    else:
        return
    found = typed.filter(bad).select(pl.len().alias("n"), pl.col(row).head(_SHOW).implode(), pl.col(
        f"__raw_{S.TIMESTAMP}" if dated else S.TIMESTAMP).first().alias(S.TIMESTAMP)).collect().row(0, named=True)
    rows = [r + table.row_offset for r in found[row]]
    first = found[S.TIMESTAMP]
    more = f" ({found['n']} rows in all)" if found["n"] > len(rows) else ""
    if guess is not None:
        hint = (
            f"they look like {UNIT_NAMES[guess]}: use --timestamp-unit {guess} "
            f"(config features.timestamp_unit: {guess})"
        )
    hint = hint or "no unit (s, ms, us, ns) makes them plausible dates: check the column"
    raise DataError(f"{what} (e.g. {first}{'' if dated else f', unit {unit}'}){more}; {hint}", file=table.file,
                    column=S.TIMESTAMP, rows=rows)
