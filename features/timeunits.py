"""Timestamp units: is an interactions file's time column plausible in the unit it is read in?

Units are multiples of one second; a timestamp (in seconds) may lie between
1980 and 2200. A value past 2200 is almost always a finer unit read as
seconds (milliseconds give year ~50000); the lower checks catch the reverse,
seconds read as a finer unit (everything within 1970-01), rows in another
unit or format beside calendar times (a 0 for a missing time, a date written
20200913, which reads as August 1970), and a column mostly of dates written
as digits (YYYYMMDD, YYYYMMDDhh, MMDDYYYY, DDMMYYYY). Relative times (all of
them small, e.g. seconds since the start of a log) pass: only their mix with
calendar times is refused. Six-digit dates (MMDDYY) cannot be told from
relative seconds and pass.
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
# epoch minutes of any date up to 2200 read as seconds fall before this (1974-01-01)
EARLY_S = 126_230_400
_SHOW = 5  # rows shown per problem


def _ymd(ts: pl.Expr) -> pl.Expr:
    """True where an integer reads as a calendar date written YYYYMMDD or
    YYYYMMDDhh (years 1900..2199): 20200913 reads as August 1970 in seconds,
    2020091303 as 2034."""
    def date(v: pl.Expr) -> pl.Expr:
        month, day = v // 100 % 100, v % 100
        return v.is_between(19_000_101, 21_991_231) & month.is_between(1, 12) & day.is_between(1, 31)

    return date(ts) | (date(ts // 100) & (ts % 100).is_between(0, 23))


def _date_digits(ts: pl.Expr) -> pl.Expr:
    """True where an integer reads as a date written YYYYMMDD, YYYYMMDDhh,
    MMDDYYYY or DDMMYYYY (years 1900..2199)."""
    year, head = ts % 10_000, ts // 10_000
    end_year = year.is_between(1900, 2199) & head.is_between(101, 3112)
    mdy = end_year & (head // 100).is_between(1, 12) & (head % 100).is_between(1, 31)
    dmy = end_year & (head % 100).is_between(1, 12) & (head // 100).is_between(1, 31)
    return _ymd(ts) | mdy | dmy


def _ymd_long(ts: pl.Expr) -> pl.Expr:
    """True where an integer reads as YYYYMMDD followed by 0..3 two-digit
    fields (hh, mm, ss), each in range: a date written as digits, at any of
    the lengths a finer unit can mistake for an epoch time."""
    def time_of_day(v: pl.Expr, fields: int) -> pl.Expr:
        ok = pl.lit(True)
        for limit in (59, 59, 23)[3 - fields:]:
            ok, v = ok & (v % 100).is_between(0, limit), v // 100
        return ok

    return pl.any_horizontal(
        _ymd(ts // 100**k) & time_of_day(ts, k) if k else _ymd(ts) for k in range(4))


# the earliest YYYYMMDDhh value, read as seconds: 2030-03-17
_YMDH_LO = 1_900_010_100


def check_timestamp_unit(typed: pl.LazyFrame, table: RawTable, bounds: tuple[int, int], unit: str, dated: bool,
                         row: str) -> None:
    """Refuse timestamps that are implausible in `unit`: most of them dates
    written as digits; after 2200; all of them before 1980 while a coarser
    unit puts the 1st and 99th percentiles in 1980..2200; some before 1974,
    or dates written as digits, beside a majority from 1980 on (some within
    January 1970 beside a minority from 1980 on); YYYYMMDDhh rows making most
    of the rows from 2030-03-17 on. The
    message names the unit they look like when there is one. A `dated` column
    (a parquet datetime or date) has its own unit: no other unit is suggested.
    `typed` holds the parsed column and the 0-based input row in `row`."""
    lo, hi = bounds
    per_s = UNIT_PER_S[unit]
    ts = pl.col(S.TIMESTAMP)
    guess: str | None = None
    hint: str | None = None
    # most times (0 placeholders aside) dates written as digits: one 0, or one 99999999, let a column through
    if not dated and hi <= 2_199_123_123 and typed.select(_date_digits(ts).filter(ts != 0).mean() > 0.5).collect().item():
        bad = _date_digits(ts)
        what = "most timestamps read as dates written as digits (YYYYMMDD, YYYYMMDDhh, MMDDYYYY or DDMMYYYY)"
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
        low, high = typed.select(ts.filter(ts > 0).quantile(q, "lower").alias(str(q)) for q in (0.01, 0.99)).collect().row(0)
        # the 99th percentile must fit the coarser unit too: relative milliseconds over two years are no seconds
        coarser = [u for u, f in UNIT_PER_S.items()
                   if f < per_s and YEAR_1980_S * f <= (low or 0) <= MAX_TS_S * f and (high or 0) <= MAX_TS_S * f]
        if not coarser:
            return
        guess = coarser[-1]
        bad = pl.lit(True)
        what = (f"every timestamp falls {'in January 1970' if hi < JANUARY_1970_S * per_s else 'before 1980'} when "
                f"read as {UNIT_NAMES[unit]}")
    elif lo < YEAR_1980_S * per_s <= hi:
        # early rows beside calendar times (a probe, 2026-12-01): with most rows from 1980 on, rows before 1974
        # (epoch minutes read as seconds end there); else only January 1970 (0 placeholders); and, unit s, rows
        # that read as dates written 20200913 (August 1970), whatever their share. A date column has its own
        # unit: January 1970 only (its 1975 dates are real)
        median = typed.select(ts.median()).collect().item()
        cut = EARLY_S if median >= YEAR_1980_S * per_s and not dated else JANUARY_1970_S
        bad = ts < cut * per_s
        if not dated:  # dates written as digits that read as before 1980 in this unit (199712041555 ms: 1976)
            bad = bad | (_ymd_long(ts) & (ts < YEAR_1980_S * per_s))
        if not typed.select(bad.any()).collect().item():
            return
        when = "before 1974" if cut == EARLY_S else "within January 1970"
        if dated:
            what, hint = f"dates {when}, beside others from 1980 on", "fix or drop those rows (a placeholder date?)"
        else:
            what = f"timestamps {when} or written as dates when read as {UNIT_NAMES[unit]}, beside others from 1980 on"
            hint = ("fix or drop those rows (a row in another unit or format, such as a date written 20200913, or 0 "
                    "written for a missing time?)")
        # most rows there, a coarser unit making them dates: the unit is wrong, not the few others
        most = typed.select((bad.sum() * 2 > pl.len()).alias("most"), ts.filter(bad).median().alias("mid")).collect().row(0)
        coarser = [u for u, f in UNIT_PER_S.items() if f < per_s and YEAR_1980_S * f <= (most[1] or 0) <= MAX_TS_S * f]
        guess = coarser[-1] if most[0] and coarser and not dated else None
    elif per_s == 1 and not dated and hi >= _YMDH_LO and typed.select(
            _ymd(ts).filter(ts >= _YMDH_LO).mean() > 0.5).collect().item():
        # dates written YYYYMMDDhh among epoch seconds read as the 2030s, inside the plausible range (a probe);
        # judged on their share of the rows from 2030-03-17 on: ~0.9% of real 2030s seconds parse so
        bad = _ymd(ts) & (ts >= _YMDH_LO)
        what = "timestamps that read as dates written YYYYMMDDhh (the 2030s when read as seconds)"
        hint = "convert them to epoch times (seconds since 1970-01-01 UTC)"
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


__all__ = ["EARLY_S", "JANUARY_1970_S", "MAX_TS_S", "UNIT_NAMES", "UNIT_PER_S", "YEAR_1980_S", "check_timestamp_unit"]
