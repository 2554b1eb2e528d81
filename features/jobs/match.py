"""`build_match_features`: the match-feature job. Reads a features folder and
an item-embeddings parquet, writes `match_features.parquet` (one row per
impression, interactions order) plus a manifest, in resumable shards of
users. The computation itself is `features.match`.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from features import match as M
from features import schemas as S
from features.core.errors import DataError, UsageError
from features.core.fingerprint import file_fingerprint
from features.core.provenance import stage_key
from features.core.manifest import (MANIFEST, atomic_outputs, atomic_write_text, is_up_to_date, read_manifest,
                                    write_manifest, write_parquet)
from features.core.paths import check_output
from features.jobs.uri import local_path, shown
from features.match import ItemSpace, MatchConfig
from features.match.config import NEGATIVE_FROM
from features.schemas import MATCH_FILE
from features.reader import check_manifest, other_items_note, read_parquet

MATCH_JOB = "features.match"
MATCH_JOB_VERSION = 3  # bump when the output of the same inputs and config changes
SHARDS_DIR = "shards"


@dataclass
class MatchResult:
    out_dir: Path
    skipped: bool  # the final output was already up to date
    complete: bool  # out_dir/match_features.parquet exists and is up to date
    manifest: dict[str, Any]  # final manifest (empty while shards are missing)
    shards_computed: list[int] = field(default_factory=list)  # shard indexes computed by this call
    seconds: float = 0.0


def parse_shard(text: str) -> tuple[int, int]:
    """'i/n' -> (i, n) with 0 <= i < n."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise UsageError(f"--shard expects i/n (e.g. 0/4), got {text!r}") from None
    if n < 1 or not 0 <= i < n:
        raise UsageError(f"--shard {text}: need 0 <= i < n")
    return i, n


def match_shard_dir(out_dir: str | Path, i: int, n: int) -> Path:
    """Folder of shard i of n: its parquet and its own small manifest."""
    return Path(out_dir) / SHARDS_DIR / f"{i:04d}-of-{n:04d}"


def concat_match_shards(folders: list[str | Path]) -> pl.DataFrame:
    """Shard outputs -> the unsharded table. Shards hold whole users; the
    interactions order is (user_id, timestamp, item_id), so one stable sort
    restores it exactly."""
    frames = [pl.read_parquet(Path(f) / MATCH_FILE) for f in folders]
    return pl.concat(frames).sort([S.USER_ID, S.TIMESTAMP, S.ITEM_ID], maintain_order=True)


def _match_key(features_dir: Path, embeddings: Path, cfg: MatchConfig) -> dict[str, Any]:
    fm = read_manifest(features_dir)
    names = (S.FILES["interactions"], S.FILES["sequences"])
    if fm is None or any(n not in fm.get("outputs", {}) for n in names):
        raise UsageError(f"{features_dir} is not a features folder (no manifest); run `recsys features build` first")
    if not embeddings.is_file():
        raise UsageError(f"embeddings file {embeddings} does not exist" if not embeddings.exists()
                         else f"--embeddings {embeddings} is not a file (a parquet file of item_id, embedding)")
    check_manifest(embeddings)  # a distill output edited after its job is not the vectors it claims to be
    for name in names:  # the key trusts the manifest's fingerprints: the files must still be those
        path = features_dir / name
        if not path.is_file():
            raise DataError("missing from the features folder (rebuild it with `recsys features build`)", file=str(path))
        check_manifest(path)
    upstream = {
        "interactions": fm["outputs"][names[0]]["fingerprint"],
        "sequences": fm["outputs"][names[1]]["fingerprint"],
        "embeddings": file_fingerprint(embeddings),
    }
    return stage_key(MATCH_JOB, {"version": MATCH_JOB_VERSION, "config": cfg.relevant()}, upstream)


def _record_inputs(out: Path, feats_dir: Path, emb_path: Path) -> dict[str, Any]:
    """The reused output's manifest, `upstream_files` pointed at this run's inputs (same bytes: the key
    matched). Negatives read the embeddings back from there: moved, they were refused (a probe, 2026-12-01)."""
    manifest = read_manifest(out) or {}
    files = {"features": str(feats_dir.resolve()), "embeddings": str(emb_path.resolve())}
    if manifest and manifest.get("upstream_files") != files:
        manifest["upstream_files"] = files
        atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=2, default=str) + "\n")
    return manifest


def _check_inputs_unchanged(features_dir: Path, embeddings: Path, key: dict[str, Any]) -> None:
    """DataError unless the inputs still hold the bytes the key was computed
    from. The job checks them when it starts, then reads them again (each
    shard part reopens the features files): an input replaced meanwhile gave
    wrong features under a key of the original bytes, which every rerun
    then reused (a probe, 2026-12-01). Checked after each shard part and
    before the final write; an input swapped away and back between two
    checks is not caught."""
    paths = {"interactions": features_dir / S.FILES["interactions"], "sequences": features_dir / S.FILES["sequences"],
             "embeddings": embeddings}  # the upstream entries of `_match_key`
    for label, path in paths.items():
        if not path.is_file() or file_fingerprint(path) != key["upstream"][label]:
            raise DataError("changed while this job read it (replaced or rewritten during the run): the features "
                            "computed would mix its old and new contents; rerun once the inputs are final", file=str(path))


def _match_part(
    features_dir: Path, users: np.ndarray, space: ItemSpace, cfg: MatchConfig, on_user: Callable[[int], None]
) -> tuple[pl.DataFrame, dict[str, int]]:
    """Match features of the impressions of `users` (interactions order)."""
    inter_file = features_dir / S.FILES["interactions"]
    users_s = pl.Series(S.USER_ID, users, dtype=pl.Int64)

    def rows_of(path: Path, columns: list[str]) -> pl.DataFrame:
        try:
            return pl.scan_parquet(path).filter(pl.col(S.USER_ID).is_in(users_s.implode())).select(columns).collect()
        except (pl.exceptions.ComputeError, OSError) as e:  # checked at the start: damaged or replaced since
            raise DataError(f"cannot be read ({str(e).strip().splitlines()[0]}): it was readable when this job "
                            "started; was it replaced or rewritten during the run?", file=str(path)) from e

    inter = rows_of(inter_file, inter_columns(cfg))
    seqs = rows_of(features_dir / S.FILES["sequences"], seq_columns(cfg))
    return match_rows(inter, seqs, space, cfg, on_user, str(inter_file))


def inter_columns(cfg: MatchConfig) -> list[str]:
    """The interactions columns the per-user step reads."""
    return [S.USER_ID, S.ITEM_ID, S.TIMESTAMP, S.POS_HIST_END, *([S.HIST_END] if cfg.negatives else [])]


def seq_columns(cfg: MatchConfig) -> list[str]:
    """The sequences columns the per-user step reads."""
    return [S.USER_ID, S.POS_ITEM_IDS, S.POS_TIMESTAMPS, *([S.ITEM_IDS, S.TIMESTAMPS, S.LABELS] if cfg.negatives else [])]


def _negative_features(
    inter: pl.DataFrame, seqs: pl.DataFrame, row_user: np.ndarray, space: ItemSpace, base: MatchConfig,
    cand_rows: np.ndarray, inter_file: str,
) -> dict[str, pl.Series]:
    """mf_neg_*: the same kernel (config `base`, negatives off) over each user's
    label-0 events strictly earlier than the impression (`seqs` sorted by user,
    `row_user` into it)."""
    offsets, item_ids, timestamps, labels = _jagged(seqs, S.ITEM_IDS, S.TIMESTAMPS, S.LABELS)
    lens = np.diff(offsets)
    neg = labels == 0  # a null label is neither positive nor negative
    before = np.concatenate([[0], np.cumsum(neg, dtype=np.int64)])  # negatives among the first k events overall
    end_all = inter[S.HIST_END].to_numpy().astype(np.int64)
    if (end_all > lens[row_user]).any():
        raise DataError(f"impressions whose history is longer than the user's sequence in {S.FILES['sequences']}; "
                        "rebuild the features", file=inter_file, column=S.HIST_END)
    start = offsets[row_user]
    end = before[start + end_all] - before[start]  # (n,) negatives strictly earlier
    ids, ts = item_ids[neg].astype(np.int64), timestamps[neg].astype(np.int64)
    hist_rows, found = space.rows(ids)
    hist = M.Histories(before[offsets], hist_rows, ts)
    if not found.all():  # missing_items == "null": unknown history items are left out
        hist, end = hist.drop(found, end, row_user)
    feats = M.compute_match_features(space, hist, row_user, cand_rows, end, base)
    # to_frame's rule for nulls (every column but the history length), renamed
    frame = M.to_frame(inter, feats, base)
    return {name: frame[src].alias(name) for name, src in NEGATIVE_FROM.items()}


def _jagged(seqs: pl.DataFrame, *cols: str) -> tuple[np.ndarray, ...]:
    """Offsets (U+1,) of the list column cols[0], then each list column's
    values end to end (an empty list adds nothing); the columns share lengths."""
    lens = seqs[cols[0]].list.len().to_numpy().astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    return offsets, *(seqs[c].to_arrow().flatten().to_numpy(zero_copy_only=False) for c in cols)


def match_rows(
    inter: pl.DataFrame, seqs: pl.DataFrame, space: ItemSpace, cfg: MatchConfig,
    on_user: Callable[[int], None] | None, inter_file: str,
) -> tuple[pl.DataFrame, dict[str, int]]:
    """The per-user step of both engines: the impressions `inter` of whole
    users and those users' positive sequences `seqs` -> match features (rows
    in the order of `inter`) and the part's counts for the manifest."""
    seqs = seqs.sort(S.USER_ID)
    seq_users = seqs[S.USER_ID].to_numpy()
    offsets, flat_ids, flat_ts = _jagged(seqs, S.POS_ITEM_IDS, S.POS_TIMESTAMPS)
    lens = np.diff(offsets)
    flat_ids, flat_ts = flat_ids.astype(np.int64), flat_ts.astype(np.int64)
    hist_rows, hist_found = space.rows(flat_ids)

    u = inter[S.USER_ID].to_numpy()
    end = inter[S.POS_HIST_END].to_numpy().astype(np.int64)
    ts = inter[S.TIMESTAMP].to_numpy()
    if len(seq_users):
        row_user = np.minimum(np.searchsorted(seq_users, u), len(seq_users) - 1)
        bad = (seq_users[row_user] != u) | (end > lens[row_user])
    else:
        row_user, bad = np.zeros(len(u), np.int64), np.ones(len(u), bool)
    if bad.any():
        raise DataError(
            f"{int(bad.sum())} impressions whose user or positive history is missing from {S.FILES['sequences']} "
            f"(users {sorted(set(u[bad].tolist()))[:10]}); rebuild the features",
            file=inter_file,
            column=S.POS_HIST_END,
        )
    # guard against stale or foreign inputs: a history must end strictly before its impression
    has = end > 0
    newest = flat_ts[offsets[row_user[has]] + end[has] - 1]
    if (newest >= ts[has]).any():
        rows = (np.flatnonzero(has)[newest >= ts[has]] + 1).tolist()
        raise DataError(
            "positive history not strictly earlier than the impression", file=inter_file, column=S.POS_HIST_END, rows=rows
        )

    hist = M.Histories(offsets, hist_rows, flat_ts)
    dropped = int((~hist_found).sum())
    if dropped:  # missing_items == "null": unknown history items are left out
        hist, end = hist.drop(hist_found, end, row_user)
    cand_rows, cand_found = space.rows(inter[S.ITEM_ID].to_numpy())
    base = dataclasses.replace(cfg, negatives=False)
    feats = M.compute_match_features(space, hist, row_user, cand_rows, end, base, on_user=on_user)
    stats = {
        "rows": inter.height,
        "users": len(seq_users),
        "rows_empty_history": int((np.minimum(end, cfg.history_cap) == 0).sum()),
        "rows_missing_candidate": int((~cand_found).sum()),
        "history_events_dropped": dropped,
    }
    frame = M.to_frame(inter, feats, base)
    if cfg.negatives:
        frame = frame.with_columns(**_negative_features(inter, seqs, row_user, space, base, cand_rows, inter_file))
    return frame, stats


def _shard_count(features_dir: Path, shard: tuple[int, int] | None, configured: int, log: Callable[[str], None]) -> int:
    """Number of shards of this run, bounded by the number of users: a shard
    holds whole users, so more shards than users would be empty (and a huge
    `n` must never cost memory or time)."""
    fm = read_manifest(features_dir) or {}
    users = int(fm.get("outputs", {}).get(S.FILES["sequences"], {}).get("rows", 0)) or 1
    if shard is not None:
        i, n = shard
        if n > users:
            raise UsageError(
                f"--shard {i}/{n}: {n:,} shards for {users:,} users of {features_dir}; "
                f"use at most {users:,} shards (each shard holds whole users)"
            )
        return n
    if configured > users:
        log(f"match: {configured} shards configured for {users} users: using {users}")
    return max(1, min(configured, users))


def _remove_shards(out: Path, keep: set[str]) -> None:
    """Remove shard folders (and their lock files) under out/shards except
    `keep`; the folder itself once empty. Temp folders of live writers stay
    (their owners clean up)."""
    root = out / SHARDS_DIR
    if not root.is_dir():
        return
    for p in root.iterdir():
        if p.name.startswith(".") or p.name in keep or not p.is_dir():
            continue
        shutil.rmtree(p, ignore_errors=True)
        (root / f".{p.name}.lock").unlink(missing_ok=True)
    if not keep and not any(root.iterdir()):
        root.rmdir()


def build_match_features(
    features_dir: str | Path,
    embeddings_path: str | Path,
    out_dir: str | Path,
    cfg: MatchConfig | None = None,
    *,
    shard: tuple[int, int] | None = None,
    force: bool = False,
    log: Callable[[str], None] = print,
    progress: bool = True,
    only_this_shard: bool = False,
) -> MatchResult:
    """Match features of every impression of `features_dir` -> `out_dir/match_features.parquet`.

    The users are split into shards by a stable hash of user_id (`cfg.shards`
    of them, or only shard i of n with `shard=(i, n)`). Each finished shard is
    written atomically with its own manifest under `out_dir/shards/`, so a
    killed run resumes after the last finished shard; once every shard of n
    is there, they are merged (interactions order) into the final file and
    manifest. Skipped when up to date (same config, features and embeddings).
    `only_this_shard`: the caller needs shard i alone (out-of-fold match
    features, one embeddings file per fold): no note about the other shards.
    """
    from tqdm import tqdm

    t0 = time.perf_counter()
    cfg = cfg or MatchConfig()
    feats_dir = Path(local_path(str(features_dir), "--features"))
    emb_path = Path(local_path(str(embeddings_path), "--embeddings"))
    out = Path(local_path(str(out_dir), "--out"))
    if cfg.engine == "spark" and shard is not None:
        raise UsageError("--shard splits the users by hand for the polars engine; the spark engine distributes them itself")
    check_output(out, {"features": feats_dir, "embeddings": emb_path})
    key = _match_key(feats_dir, emb_path, cfg)
    n = _shard_count(feats_dir, shard, cfg.shards, log)
    if not force and is_up_to_date(out, key):
        log(f"match: {shown(out)} is up to date (same config, features and embeddings); skipping")
        return MatchResult(out, True, True, _record_inputs(out, feats_dir, emb_path), [], time.perf_counter() - t0)
    if cfg.engine == "spark":
        return _match_spark(feats_dir, emb_path, out, key, cfg, log, t0)
    todo = [shard[0]] if shard else list(range(n))

    def shard_key(i: int) -> dict[str, Any]:
        return {**key, "shard": [i, n]}

    pending = [i for i in todo if force or not is_up_to_date(match_shard_dir(out, i, n), shard_key(i))]
    if len(pending) < len(todo):
        log(f"match: resuming: {len(todo) - len(pending)} of {len(todo)} shards already done")

    computed: list[int] = []
    if pending:
        space, missing = item_space(feats_dir, emb_path, cfg, log)
        users = pl.scan_parquet(feats_dir / S.FILES["sequences"]).select(S.USER_ID).collect()[S.USER_ID].to_numpy()
        of = M.stable_shard(users, n)
        bar = tqdm(total=int(np.isin(of, pending).sum()), unit="user", desc="match", disable=None if progress else True)
        for i in pending:
            frame, stats = _match_part(feats_dir, users[of == i], space, cfg, bar.update)
            _check_inputs_unchanged(feats_dir, emb_path, key)
            with atomic_outputs(match_shard_dir(out, i, n)) as tmp:
                write_parquet(frame, tmp / MATCH_FILE)
                write_manifest(
                    tmp,
                    job=MATCH_JOB,
                    key=shard_key(i),
                    outputs=[MATCH_FILE],
                    extra={"stats": {**stats, "items_missing": len(missing), "dim": space.dim}},
                )
            computed.append(i)
        bar.close()

    dirs = [match_shard_dir(out, i, n) for i in range(n)]
    not_done = [i for i, d in enumerate(dirs) if not is_up_to_date(d, shard_key(i), verify_outputs=False)]
    if not_done:
        secs = time.perf_counter() - t0
        why = ", ".join(f"{i}/{n} ({'not run yet' if read_manifest(dirs[i]) is None else 'built from other inputs or config'})"
                        for i in not_done[:10]) + (" ..." if len(not_done) > 10 else "")
        log(f"match: wrote shard(s) {computed} of {n} under {out / SHARDS_DIR} in {secs:.1f}s" + ("" if only_this_shard else
            f"; not merged until every shard is done with these inputs and config: run {why} "
            f"(--shard i/{n}, same inputs and config)"))
        return MatchResult(out, False, False, {}, computed, secs)
    parts = [read_manifest(d) or {} for d in dirs]
    total = {k: sum(p["stats"][k] for p in parts) for k in parts[0]["stats"] if k not in ("items_missing", "dim")}
    total |= {k: parts[0]["stats"][k] for k in ("items_missing", "dim")}
    manifest = _write_final(out, key, concat_match_shards(dirs), total, cfg, n, feats_dir, emb_path)
    # merged: the parts of other layouts (an older --shard i/m, another
    # config's shard count) are stale, and after an unsharded run its own
    # parts are redundant too
    _remove_shards(out, keep=set() if shard is None else {d.name for d in dirs})
    secs = time.perf_counter() - t0
    log(f"match: wrote {shown(out / MATCH_FILE)} [polars] ({total['rows']:,} rows, {total['users']:,} users) in {secs:.1f}s")
    return MatchResult(out, False, True, manifest, computed, secs)


def item_space(feats_dir: Path, emb_path: Path, cfg: MatchConfig, log: Callable[[str], None]) -> tuple[ItemSpace, np.ndarray]:
    """The checked item vectors, their semantic IDs and faiss index (a global
    step: built once, on the driver, for either engine) and the ids of the
    interactions' items without a vector.

    The item universe is the features folder's items file: vectors of other
    ids (a larger catalogue's file) are left out, with a warning, so that they
    neither enter the faiss index (mf_faiss_rank) nor the semantic-ID k-means."""
    emb_df = read_parquet(emb_path)  # an unreadable file is a DataError naming it
    ids, vec = M.validate_embeddings(emb_df, str(emb_path), cfg.dim)
    note = other_items_note(feats_dir, emb_path)
    if note:
        log(note)
    catalogue = read_parquet(feats_dir / S.FILES["items"], [S.ITEM_ID])[S.ITEM_ID].to_numpy()
    known = np.isin(ids, catalogue)
    if not known.all():
        extra = np.sort(ids[~known])
        log(f"warning: {emb_path}: {len(extra):,} vectors of item ids not in {feats_dir / S.FILES['items']} are left "
            f"out of the index (ids {', '.join(map(str, extra[:5].tolist()))}{' ...' if len(extra) > 5 else ''})")
        ids, vec = ids[known], vec[known]
        if not len(ids):
            raise DataError(f"no vector is of an item of {feats_dir / S.FILES['items']}: embeddings of another "
                            "catalogue?", file=str(emb_path), column=S.ITEM_ID)
    needed = pl.scan_parquet(feats_dir / S.FILES["interactions"]).select(pl.col(S.ITEM_ID).unique()).collect()
    missing = M.check_missing_items(ids, needed[S.ITEM_ID].to_numpy(), str(emb_path), cfg.missing_items)
    if len(missing):
        log(f"warning: {emb_path}: {len(missing)} items without a vector get null match features")
    return ItemSpace.build(ids, vec, cfg), missing


def _write_final(out: Path, key: dict[str, Any], frame: pl.DataFrame, total: dict[str, int], cfg: MatchConfig,
                 shards: int, feats_dir: Path, emb_path: Path) -> dict[str, Any]:
    """Check the row count and the inputs, then write match_features.parquet and its manifest atomically."""
    _check_inputs_unchanged(feats_dir, emb_path, key)
    expected = (read_manifest(feats_dir) or {})["outputs"][S.FILES["interactions"]]["rows"]
    if frame.height != expected:  # e.g. users of the interactions missing from sequences.parquet
        raise DataError(
            f"the match features hold {frame.height:,} rows, the interactions {expected:,}: rebuild the features",
            file=str(feats_dir / S.FILES["sequences"]),
            column=S.USER_ID,
        )
    with atomic_outputs(out) as tmp:
        write_parquet(frame, tmp / MATCH_FILE)
        return write_manifest(
            tmp,
            job=MATCH_JOB,
            key=key,
            outputs=[MATCH_FILE],
            extra={
                "engine": cfg.engine,  # recorded, not keyed: both engines write the same bytes
                "config": cfg.relevant(),
                "columns": cfg.columns(),
                "shards": shards,
                # absolute: the ranker's sampled negatives read the embeddings back from here, from any cwd
                "upstream_files": {"features": str(feats_dir.resolve()), "embeddings": str(emb_path.resolve())},
                "stats": total,
            },
        )


def _match_spark(feats_dir: Path, emb_path: Path, out: Path, key: dict[str, Any], cfg: MatchConfig,
                 log: Callable[[str], None], t0: float) -> MatchResult:
    """The whole job on Spark: `match_rows` per bucket of users (features.spark.match)."""
    from features.spark.match import match_on_spark

    space, missing = item_space(feats_dir, emb_path, cfg, log)
    frame, total = match_on_spark(feats_dir, space, cfg)
    total |= {"items_missing": len(missing), "dim": space.dim}
    manifest = _write_final(out, key, frame, total, cfg, 1, feats_dir, emb_path)
    _remove_shards(out, keep=set())  # parts of earlier polars runs are stale now
    secs = time.perf_counter() - t0
    log(f"match: wrote {shown(out / MATCH_FILE)} [spark] ({frame.height:,} rows, {total['users']:,} users) in {secs:.1f}s")
    return MatchResult(out, False, True, manifest, [], secs)
