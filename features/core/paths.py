"""Output-path guards: checked before any work, so a bad `--out` never costs a
run and never touches an input.

Every command that writes calls `check_output(out, inputs)` first:
- `out` may not equal, contain or lie inside any input (resolved real paths,
  symlinks followed), nor the reverse: a job must never overwrite or delete
  what it reads;
- a folder output may not be an existing file (and a file output may not be
  an existing folder);
- the nearest existing ancestor of `out` must be writable.

>>> import tempfile, pathlib
>>> d = pathlib.Path(tempfile.mkdtemp())
>>> check_output(d / "out", {"--features": d / "features"}).name
'out'
>>> check_output(d, {"--interactions": d / "events.csv"})  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
features.core.errors.UsageError: --out ... contains input --interactions ...
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from features.core.errors import UsageError

PathLike = str | os.PathLike


def real(path: PathLike) -> Path:
    """Absolute path with every symlink resolved (missing tails kept as given)."""
    return Path(os.path.realpath(os.path.abspath(os.fspath(path))))


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


GLOB_CHARS = ("[", "]", "*", "?", "{", "}")  # polars' and Hadoop's glob syntax


def check_output(
    out: PathLike,
    inputs: Mapping[str, PathLike | None],
    *,
    flag: str = "--out",
    kind: str = "folder",
) -> Path:
    """Refuse (UsageError, exit 2) an output that overlaps an input or cannot be
    written; returns the resolved output path. `inputs` maps a name for the
    message (a flag or config key) to a path; None entries are ignored.
    `kind` is "folder" or "file": what the command will create at `out`."""
    out_r = real(out)
    for name, p in [(flag, out), *inputs.items()]:
        if p is not None and any(c in str(real(p)) for c in GLOB_CHARS):
            raise UsageError(f"{name} {p}: the path holds one of {' '.join(GLOB_CHARS)}, which polars and Spark read as "
                             "a file-name pattern, not as characters: rename the folder or file")
    for name, p in inputs.items():
        if p is None:
            continue
        in_r = real(p)
        if out_r == in_r:
            raise UsageError(f"{flag} {out} is the same path as input {name} {p}: refusing to overwrite an input")
        if _inside(in_r, out_r):
            raise UsageError(f"{flag} {out} contains input {name} {p}: choose an output folder outside the inputs")
        if _inside(out_r, in_r):
            raise UsageError(f"{flag} {out} lies inside input {name} {p}: choose an output path outside the inputs")
    if kind == "folder" and out_r.exists() and not out_r.is_dir():
        raise UsageError(f"{flag} {out} is an existing file; expected a folder (or a path that does not exist yet)")
    if kind == "file" and out_r.is_dir():
        raise UsageError(f"{flag} {out} is an existing folder; expected a file path")
    anc = out_r
    while not anc.exists():
        anc = anc.parent
    if not anc.is_dir():
        raise UsageError(f"{flag} {out}: {anc} is a file, so nothing can be created under it")
    if not os.access(anc, os.W_OK | os.X_OK) or _virtual(anc):
        raise UsageError(f"{flag} {out}: {anc} is not writable")
    return out_r


def _virtual(p: Path) -> bool:
    """Under /proc or /sys: kernel filesystems that say writable to root (os.access) but hold no new files."""
    return p.parts[:2] in (("/", "proc"), ("/", "sys"))
