"""CSV shapes a user's export gets wrong, named before they are read as wrong values.

polars reads a CSV fast but forgives what a user should hear about: a short
row (values shift into the wrong columns), a `"` inside an unquoted field
(lines joined), CR-only line ends, header names with spaces around them or
capitals, blank lines at the end. The checks here make one pass of Python's
csv reader where polars gives no row, and name the file, line and column.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import polars as pl

from features import schemas as S
from features.core.errors import DataError, SchemaError


# what most malformed CSVs hold; polars names neither the line nor the column
QUOTE_HINT = ('; a common cause: a " inside a field that is not quoted (12" vinyl), or a quoted field '
              'not closed: quote the whole field and double the quotes inside ("12"" vinyl")')


def quote_hint(e: Exception, file: str | Path | None = None) -> str:
    """QUOTE_HINT for a CSV parser error that looks like a quoting problem, else "".

    polars names neither row nor line of a field that opens with a quote and
    goes on after the closing one ("Weird" Al movie: "could not parse
    `"Weird" Al movie` as dtype `str`"); with `file`, the first line holding
    that field is named."""
    text = str(e)
    field = re.search(r"could not parse `(.*?)` as dtype", text, re.S)
    stray = field is not None and '"' in field.group(1)
    if not (stray or "malformed" in text.lower() or "quot" in text.lower()):
        return ""
    line = _first_line_with(file, field.group(1)) if stray and file is not None else None
    return (f" (line {line} of the file)" if line else "") + QUOTE_HINT


def _first_line_with(file: str | Path, value: str) -> int | None:
    """1-based number of the first line of `file` that holds `value` (None if none). Error path only."""
    needle = value.splitlines()[0] if value.strip() else value
    try:
        with open(file, encoding="utf-8", errors="replace") as f:
            return next((n for n, line in enumerate(f, start=1) if needle in line), None)
    except OSError:
        return None


@contextmanager
def _records(p: Path) -> Iterator[tuple[list[str], Iterator[list[str]], Any]]:
    """(header, the data records, the reader: its line_num is the line where
    the last record ended) of CSV `p` by Python's csv reader, quotes and
    embedded newlines handled. csv.Error/OSError propagate."""
    import csv

    # the csv module refuses fields over 131,072 characters (a long description): the checks then
    # passed silently and a short row went through (a probe, 2026-12-01)
    csv.field_size_limit(sys.maxsize)
    with open(p, newline="", encoding="utf-8", errors="replace") as f:
        reader = csv.reader(f, delimiter="\t" if p.suffix.lower() == ".tsv" else ",")
        yield next(reader, []), reader, reader


def first_ragged_row(p: str | Path, shorter: bool) -> tuple[int, int, int, list[str]] | None:
    """The first record of CSV `p` with fewer (`shorter`) or more fields than
    its header, as (1-based data row, 1-based line of the file where it ends,
    its field count, the header); None if none, or when Python's csv reader
    cannot parse the file (then polars names the problem). Blank lines are
    left to the other checks."""
    import csv

    try:
        with _records(Path(p)) as (header, rows, reader):
            for number, row in enumerate(rows, start=1):
                if row and (len(row) < len(header) if shorter else len(row) > len(header)):
                    return number, reader.line_num, len(row), header
    except (OSError, csv.Error):
        return None
    return None


def _lone_cr_note(p: Path) -> str:
    """A note when CSV `p` holds a carriage return not followed by a line feed:
    Python's csv reader ends a record there (so a field holding one reads as a
    short row) while polars does not. Error path only."""
    data = p.read_bytes()
    return ("; or the file holds a carriage return inside a field (a lone CR ends a line for most CSV readers): "
            "remove it or quote the field") if data.count(b"\r") > data.count(b"\r\n") else ""


# a " with a character other than a separator, a quote or a line end on both sides: 12" vinyl
_STRAY_QUOTE = re.compile(r'(?<=[^,\t"\r\n])"(?=[^,\t"\r\n])')


def check_csv_shape(lf: pl.LazyFrame, p: Path) -> None:
    """One pass of Python's csv reader over CSV `p` (`lf`: polars' scan of it):

    - DataError naming the first record with fewer fields than the header.
      polars reads the missing trailing fields as null, so "88,c3" under
      "item_id,text,category" gives item 88 the text "c3": the values after a
      dropped field land in the wrong columns.
    - DataError when polars reads fewer rows than the file holds records: two
      `"` inside unquoted fields (12" vinyl) make polars read everything
      between them as one quoted field, swallowing whole lines (half of a
      file's rows were lost, exit 0: a probe, 2026-12-01); names the first
      line with such a quote.
    """
    import csv

    records = 0
    try:
        with _records(p) as (header, rows, reader):
            for number, row in enumerate(rows, start=1):
                if not row:
                    continue
                records += 1
                if len(row) < len(header):
                    raise DataError(
                        f"{len(row)} fields (line {reader.line_num} of the file), the header has {len(header)}: the "
                        "values after a missing field would land in the wrong columns; write an empty field for a "
                        f"missing value (88,,c3){_lone_cr_note(p)}", file=str(p), column=header[len(row)], rows=[number])
    except (OSError, csv.Error):
        return  # polars names the problem
    try:
        got = lf.select(pl.len()).collect().item()
    except Exception:  # noqa: BLE001 - an unreadable file: the validation names it with its row
        return
    if got >= records:
        return
    with open(p, encoding="utf-8", errors="replace") as f:
        line = next((n for n, text in enumerate(f, start=1) if _STRAY_QUOTE.search(text)), None)
    where = f"line {line} holds a \" inside an unquoted field" if line else "a \" inside an unquoted field joins lines"
    raise DataError(f"the CSV reader finds {got:,} rows where the file holds {records:,} records: {where}{QUOTE_HINT}",
                    file=str(p))


def text_candidates(lf: pl.LazyFrame) -> list[str]:
    """The items' string columns that could be the text (`--text-column`),
    most distinct values first (a title or description before a genre),
    judged on the first 1,000 rows; columns of numbers only (every CSV column
    arrives as a string) are left out."""
    cols = S.text_columns(lf.collect_schema())
    if not cols:
        return []
    sample = lf.select(cols).head(1_000).collect()

    def numbers_only(c: str) -> bool:
        v = sample[c].drop_nulls().str.strip_chars()
        v = v.filter(v != "")
        return v.len() > 0 and bool(v.cast(pl.Float64, strict=False).is_not_null().all())

    return sorted((c for c in cols if not numbers_only(c)), key=lambda c: -sample[c].n_unique())


def found_columns(names: list[str]) -> str:
    """"found columns: ..." for a missing-column message, with a hint when the
    header looks like another separator's or holds spaces around names."""
    shown = ", ".join(repr(n) if n != n.strip() else n for n in names) or "(none)"
    seps = [sep for sep in (";", "\t", "|") if any(sep in n for n in names)]
    if len(names) == 1 and seps:
        return (f"found one column {names[0]!r}: the file looks separated by {seps[0]!r}, not ','; save it "
                "comma-separated (or tab-separated as .tsv)")
    spaced = [n for n in names if n != n.strip()]
    if spaced:
        return f"found columns: {shown}; names with spaces around them ({spaced[0]!r}) do not match: remove the spaces"
    return f"found columns: {shown}"


def near_names(names: list[str], wanted: tuple[str, ...], file: str) -> None:
    """SchemaError for a column whose name is one of `wanted` but for case or
    spaces around it (' label', 'Label') while the exact name is absent: the
    build reads exact names only, so such a column would be ignored silently
    (labels then came from the ratings: a probe, 2026-12-01)."""
    for n in names:
        exact = next((w for w in wanted if n != w and n.strip().lower() == w and w not in names), None)
        if exact is not None:
            fix = "remove the spaces around it" if n != n.strip() else "write it in lower case"
            raise SchemaError(f"column {n!r} would not be read as {exact!r} (names are exact): {fix}", file=file, column=n)


# bytes read from a CSV's end to count its trailing blank lines
SNIFF_BYTES = 1 << 16


def trailing_blank_lines(p: Path) -> int:
    """Empty lines ("" or a lone CR) at the end of CSV file `p`, after its
    last record's line end. polars reads each as a row of nulls (pandas
    skips them); editors and exports often leave a few. 0 when the file's
    last 64 KiB hold nothing but blank lines (then the rows stay, and a
    null-value error names them)."""
    size = p.stat().st_size
    with open(p, "rb") as f:
        f.seek(max(0, size - SNIFF_BYTES))
        tail = f.read()
    lines = tail.split(b"\n")
    if lines[-1] in (b"", b"\r"):  # the last line's end (or a final blank line without one)
        lines.pop()
    n = 0
    while n < len(lines) and lines[-1 - n] in (b"", b"\r"):
        n += 1
    return 0 if n == len(lines) else n


def drop_blank_tail(lf: pl.LazyFrame, p: Path) -> tuple[pl.LazyFrame, str | None]:
    """`lf` without the rows of `p`'s trailing blank lines, and a note saying so (None if none)."""
    n = trailing_blank_lines(p)
    if not n:
        return lf, None
    keep = pl.int_range(pl.len(), dtype=pl.Int64) < pl.len().cast(pl.Int64) - n
    return lf.filter(keep), f"{p}: {n:,} blank line{'s' if n > 1 else ''} at the end of the file skipped (no values)"


__all__ = [
    "QUOTE_HINT", "SNIFF_BYTES", "check_csv_shape", "drop_blank_tail",
    "first_ragged_row", "found_columns", "near_names", "quote_hint", "text_candidates", "trailing_blank_lines",
]
