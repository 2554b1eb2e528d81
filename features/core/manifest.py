"""Artifact manifests and atomic multi-file output.

A job writes every file under a hidden temp folder next to its output folder,
then moves them into place, manifest last. Readers trust an artifact only when
its manifest is present and fingerprints match: a killed job leaves either the
old complete output or no manifest, never a half-written file under its final
name.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import polars as pl

from features.core.fingerprint import file_fingerprint
from features.core.numeric import json_safe

MANIFEST = "manifest.json"


def write_parquet(df: pl.DataFrame, path: Path) -> None:
    """The project's parquet settings: zstd level 1 (near level-3 size, faster)."""
    df.write_parquet(path, compression="zstd", compression_level=1)


def schema_dict(schema: pl.Schema) -> dict[str, str]:
    return {k: str(v) for k, v in schema.items()}


def describe_parquet(path: Path) -> dict[str, Any]:
    lf = pl.scan_parquet(path)
    return {
        "rows": lf.select(pl.len()).collect().item(),
        "fingerprint": file_fingerprint(path),
        "schema": schema_dict(lf.collect_schema()),
    }


def read_manifest(folder: str | Path) -> dict[str, Any] | None:
    p = Path(folder) / MANIFEST
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError:
        return None


def output_info(folder: str | Path, name: str) -> dict[str, Any]:
    """What the manifest of `folder` records of its output file `name`
    (rows, fingerprint, schema); {} when there is no such record."""
    return ((read_manifest(folder) or {}).get("outputs") or {}).get(name) or {}


def outputs_fingerprint(manifest: Mapping[str, Any] | None) -> str:
    """One fingerprint of a manifest's outputs ("" when it lists none)."""
    outputs = (manifest or {}).get("outputs") or {}
    if not outputs:
        return ""
    h = hashlib.blake2b(digest_size=16)
    for name, info in sorted(outputs.items()):
        h.update(f"{name}:{info.get('fingerprint')}".encode())
    return h.hexdigest()


def folder_fingerprint(location: str | Path) -> str:
    """Content fingerprint of a stage's output: a file's own, or a folder's
    manifest outputs' ("" when the folder has no manifest)."""
    p = Path(location)
    return file_fingerprint(p) if p.is_file() else outputs_fingerprint(read_manifest(p))


def is_up_to_date(folder: str | Path, key: Mapping[str, Any], *, verify_outputs: bool = True) -> bool:
    """True when the folder's manifest was made from the same `key` (a
    `features.core.provenance.stage_key`: stage, params, plugin code,
    upstream fingerprints) and its outputs are intact. A key whose code is
    unknown (`code_hash` "") never matches: unknown code is never reused."""
    if "code_hash" in key and not key["code_hash"]:
        return False
    m = read_manifest(folder)
    if m is None or m.get("key") != json.loads(json.dumps(key, sort_keys=True, default=str)):
        return False
    for name, info in m.get("outputs", {}).items():
        p = Path(folder) / name
        if not p.is_file():
            return False
        if verify_outputs and file_fingerprint(p) != info.get("fingerprint"):
            return False
    # side files (a teachers.pt, a metrics.json): a stage's reuse serves them too, so a deleted or
    # replaced one reruns the stage (a mapping carries fingerprints; a list, names only)
    files = m.get("files") or {}
    for name, fingerprint in (files.items() if isinstance(files, Mapping) else ((f, None) for f in files)):
        p = Path(folder) / name
        if not p.is_file():
            return False
        if verify_outputs and fingerprint is not None and file_fingerprint(p) != fingerprint:
            return False
    return True


def outputs_intact(folder: str | Path) -> bool:
    """Whether `folder` holds a manifest whose outputs and side files are all
    there with the bytes it recorded (`is_up_to_date` against its own key)."""
    m = read_manifest(folder)
    return m is not None and is_up_to_date(folder, m.get("key") or {})


def nested_fingerprints(folder: str | Path, subs: tuple[str, ...]) -> dict[str, str]:
    """Fingerprints of the manifests of `folder`'s nested stage folders (a
    distill output's teachers/ and student/), for the outer manifest's
    `nested` entry (see `nested_intact`)."""
    return {sub: file_fingerprint(Path(folder) / sub / MANIFEST) for sub in subs
            if (Path(folder) / sub / MANIFEST).is_file()}


def nested_intact(folder: str | Path, subs: tuple[str, ...]) -> bool:
    """Whether each nested stage folder is still the one the outer stage was
    published with (its manifest's fingerprint in the outer `nested` entry)
    and intact (`outputs_intact`): an outer stage's reuse serves from them (a
    distill output registers student/student.pt), and another run's folder
    copied in, self-consistent as it is, is not this run's (a probe,
    2026-12-01)."""
    recorded = (read_manifest(folder) or {}).get("nested") or {}
    for sub in subs:
        manifest = Path(folder) / sub / MANIFEST
        if not manifest.is_file() or recorded.get(sub) != file_fingerprint(manifest) or not outputs_intact(manifest.parent):
            return False
    return True


TMP_MARK = ".tmp-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def clean_stale_temps(folder: str | Path) -> list[Path]:
    """Remove the temp folders that killed runs left next to `folder`
    (`.NAME.tmp-PID-XXXX` whose PID is gone, or of the older pid-less form).
    Temp folders of live processes are left alone. Returns what was removed."""
    final = Path(folder)
    removed = []
    if not final.parent.is_dir():
        return removed
    for p in final.parent.glob(f".{final.name}{TMP_MARK}*"):
        tail = p.name[len(f".{final.name}{TMP_MARK}"):]
        pid_s, _, rest = tail.partition("-")
        if rest and pid_s.isdigit() and _pid_alive(int(pid_s)):
            continue
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        removed.append(p)
    return removed


@contextmanager
def _folder_lock(final: Path) -> Iterator[None]:
    """Serialise the move-into-place of concurrent writers of one folder, so
    a folder never mixes the files of two runs."""
    import fcntl

    lock = final.parent / f".{final.name}.lock"
    with open(lock, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextmanager
def run_lock(folders: list[Path], rank: int = 0, log: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold `.NAME.run.lock` beside each folder, exclusively, for a whole run
    that writes into the folder in place (the ranker's checkpoints: two runs
    of different configs into one --out read each other's best.pt and
    reported and registered the other's model, exit 0: a probe, 2026-12-01).
    A second run waits, saying so, and then finds the first one's outputs.

    `rank`: a distributed run's process; rank r > 0 holds `.NAME.run.rankR.lock`,
    so two torchrun jobs exclude each other rank by rank (a shared lock let
    them train together), and a single-process run excludes a job's rank 0
    (its other ranks then wait for it at their first collective). Polls, so
    Ctrl-C interrupts the wait."""
    import fcntl
    from contextlib import ExitStack

    suffix = f".rank{rank}" if rank else ""
    with ExitStack() as stack:
        for folder in sorted({Path(f).resolve() for f in folders}, key=str):  # one order: no deadlock
            folder.parent.mkdir(parents=True, exist_ok=True)
            fh = stack.enter_context(open(folder.parent / f".{folder.name}.run{suffix}.lock", "a"))
            told = False
            while True:
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if log is not None and not told:
                        log(f"waiting: another run is writing {folder}")
                    told = True
                    time.sleep(0.2)  # a blocking flock would not return to Python for Ctrl-C
        yield


@contextmanager
def atomic_outputs(folder: str | Path) -> Iterator[Path]:
    """Yield a temp folder; on success move its files into `folder` (manifest
    last, old manifest removed first); on error delete it and leave `folder`
    exactly as it was. Temp folders of earlier killed runs are removed first."""
    final = Path(folder)
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists() and not final.is_dir():
        from features.core.errors import UsageError

        raise UsageError(f"output {final} is an existing file; expected a folder")
    clean_stale_temps(final)
    tmp = final.parent / f".{final.name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        with _folder_lock(final):
            final.mkdir(exist_ok=True)
            names = sorted(p.name for p in tmp.iterdir())
            if (final / MANIFEST).exists():
                (final / MANIFEST).unlink()
            for name in names:
                if name != MANIFEST:
                    if (final / name).is_dir() and (tmp / name).is_dir():
                        shutil.rmtree(final / name)
                    os.replace(tmp / name, final / name)
            if MANIFEST in names:
                os.replace(tmp / MANIFEST, final / MANIFEST)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_manifest(
    tmp: Path, *, job: str, key: Mapping[str, Any], outputs: list[str] | Mapping[str, dict], extra: Mapping[str, Any]
) -> dict:
    """`outputs`: the file names under `tmp`, or the names mapped to their
    `describe_parquet` already made (by the threads that wrote the files)."""
    described = dict(outputs) if isinstance(outputs, Mapping) else {name: describe_parquet(tmp / name) for name in outputs}
    manifest = {
        "job": job,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "key": json.loads(json.dumps(key, sort_keys=True, default=str)),
        "outputs": described,
        **extra,
    }
    # strict JSON: a NaN (a valid score with nothing to score, say) is written as null
    manifest = json_safe(manifest)
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False, default=str, allow_nan=False) + "\n")
    return manifest


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `path` (same folder, hidden); on success it is
    renamed onto `path` in one step, on error deleted: a reader never sees a
    half-written file under the final name."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically (see `atomic_file`)."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
