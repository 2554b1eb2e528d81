"""What made a run, and when a stage is reused: code version, git state, stage keys.

Every run is tagged `code_version` and `code_hash` (the plugin's version and
a hash of its own source files), and `git_commit` and `git_dirty` when the
plugin itself lives in a git checkout.

Stage reuse
-----------
A stage is not recomputed when an earlier run of the same stage FINISHED with
the same key: (stage name, params hash, plugin version + hash of the plugin's
installed source files, upstream fingerprints). The key's hash is the run's
`reuse_key` tag. The code is the plugin's own (the `.py` files of `recsys`,
`features` and `distill`, wherever they are installed), never the repository
of the working directory: running from inside another repository, or outside
any, changes nothing; editing one source file changes every key. When the
source files cannot be found the code version is unknown and nothing is
reused. A FAILED or KILLED run is never reused, nor
one whose recorded `outputs` folder no longer exists. Put everything that
changes a stage's output (seed included) in its params or upstream.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from features.core.config import config_hash, to_dict

REUSE_KEY_VERSION = 2  # 2: keyed on the plugin's own code, not the working directory's git
DIST_NAME = "recsys-plugin"
PACKAGES = ("recsys", "features", "distill")  # the plugin's code: what a reuse key covers
# Untracked files of these kinds make the tree dirty (new code or config);
# other untracked files (outputs, notebooks' checkpoints) do not.
CODE_SUFFIXES = (".py", ".pyx", ".yaml", ".yml", ".toml", ".cfg", ".ini")


@dataclass(frozen=True)
class GitInfo:
    """Code version of a run. `commit` is "unknown" outside a git repository."""

    commit: str = "unknown"
    dirty: bool | None = None  # None: unknown
    diff_hash: str = ""  # hash of the uncommitted changes ("" when clean)

    def tags(self) -> dict[str, str]:
        dirty = "unknown" if self.dirty is None else str(self.dirty).lower()
        out = {"git_commit": self.commit, "git_dirty": dirty}
        if self.diff_hash:
            out["git_diff_hash"] = self.diff_hash
        if self.commit != "unknown":
            out["mlflow.source.git.commit"] = self.commit
        return out


def git_info(path: str | Path | None = None, *, ignore: tuple[str | Path, ...] = ()) -> GitInfo:
    """Commit of the repository holding `path` (default: the working directory),
    whether the tree is dirty, and a hash of the uncommitted changes."""
    cwd = Path(path or Path.cwd())

    def git(*args: str, at: Path = cwd) -> bytes:
        return subprocess.run(
            ["git", "-C", str(at), *args], capture_output=True, timeout=30, check=True
        ).stdout

    try:
        top = Path(git("rev-parse", "--show-toplevel").decode().strip())
        commit = git("rev-parse", "HEAD", at=top).decode().strip()
        diff = git("diff", "HEAD", "--binary", at=top)
        listing = git("ls-files", "--others", "--exclude-standard", "-z", at=top)
        others = [Path(os.fsdecode(f)) for f in listing.split(b"\0") if f]
    except (OSError, subprocess.SubprocessError):
        return GitInfo()
    ignored = [Path(p).resolve() for p in ignore]
    untracked = sorted(
        f for f in others
        if f.suffix in CODE_SUFFIXES and not any((top / f).resolve().is_relative_to(i) for i in ignored)
    )
    if not diff and not untracked:
        return GitInfo(commit, False, "")
    h = hashlib.sha256(diff)
    for f in untracked:
        h.update(b"\0" + os.fsencode(f) + b"\0")
        try:
            h.update(hashlib.sha256((top / f).read_bytes()).digest())
        except OSError:
            h.update(b"<unreadable>")
    return GitInfo(commit, True, h.hexdigest()[:16])


def source_files() -> list[tuple[str, Path]]:
    """(name, path) of every `.py` file of the plugin's packages, wherever
    they are installed (found without importing them)."""
    import importlib.util

    out: list[tuple[str, Path]] = []
    for pkg in PACKAGES:
        spec = importlib.util.find_spec(pkg)
        for loc in (spec.submodule_search_locations or []) if spec else []:
            base = Path(loc)
            out += [(f"{pkg}/{f.relative_to(base).as_posix()}", f) for f in base.rglob("*.py") if "__pycache__" not in f.parts]
    return sorted(out)


def hash_sources(files: list[tuple[str, Path]]) -> str:
    """Hash of (name, content) of `files`; "" when there are none."""
    if not files:
        return ""
    h = hashlib.sha256()
    for name, path in sorted(files):
        h.update(name.encode() + b"\0")
        try:
            h.update(hashlib.sha256(path.read_bytes()).digest())
        except OSError:
            h.update(b"<unreadable>")
    return h.hexdigest()[:16]


@functools.lru_cache(maxsize=1)
def _plugin_code() -> tuple[str, str]:
    """(version, source hash) of the plugin, once per process."""
    import importlib.metadata

    try:
        version = importlib.metadata.version(DIST_NAME)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return version, hash_sources(source_files())


def _package_git(ignore: tuple[str | Path, ...] = ()) -> GitInfo:
    """Git state of the checkout the plugin's own files live in (tags only);
    unknown when the package is not a tracked file of a repository (e.g. a
    site-packages folder inside some project's ignored .venv)."""
    pkg = Path(__file__).resolve().parents[1]  # the `recsys` package folder
    try:
        subprocess.run(["git", "-C", str(pkg), "ls-files", "--error-unmatch", "__init__.py"],
                       capture_output=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return GitInfo()
    return git_info(pkg, ignore=ignore)


@dataclass(frozen=True)
class CodeVersion:
    """The code that made a run. Reuse keys on `version` + `source_hash` (the
    plugin's own source files); `git` is informational (tags), known only when
    the plugin lives in a git checkout."""

    version: str = "unknown"
    source_hash: str = ""  # "" -> unknown: nothing is reused
    git: GitInfo = field(default_factory=GitInfo)

    @property
    def known(self) -> bool:
        return bool(self.source_hash)

    def tags(self) -> dict[str, str]:
        out = {"code_version": self.version, "code_hash": self.source_hash or "unknown"}
        if self.git.commit != "unknown":
            out |= self.git.tags()
        return out


def code_version(*, ignore: tuple[str | Path, ...] = ()) -> CodeVersion:
    """The plugin's version, source hash (cached per process) and the git
    state of its own checkout; `ignore`: folders (the store) that must not make
    that checkout dirty. Never looks at the working directory."""
    version, source_hash = _plugin_code()
    return CodeVersion(version, source_hash, _package_git(ignore))


def fingerprint(upstream: Mapping[str, str] | None) -> str:
    """One fingerprint for a stage's inputs: hash of its upstream fingerprints."""
    if not upstream:
        return "none"
    return config_hash({str(k): str(v) for k, v in upstream.items()})


def _as_mapping(params: Any) -> dict[str, Any]:
    if params is None:
        return {}
    if dataclasses.is_dataclass(params) and not isinstance(params, type):
        return to_dict(params)
    if isinstance(params, Mapping):
        return {k: _as_mapping(v) if dataclasses.is_dataclass(v) and not isinstance(v, type) else v for k, v in params.items()}
    raise TypeError(f"params must be a mapping or a config dataclass, got {type(params).__name__}")


def stage_key(stage: str, params: Any, upstream: Mapping[str, str] | None, code: CodeVersion) -> dict[str, Any]:
    """What must match for a stage to be reused (see the module docstring)."""
    return {
        "v": REUSE_KEY_VERSION,
        "stage": stage,
        "params_hash": config_hash(_as_mapping(params)),
        "code_version": code.version,
        "code_hash": code.source_hash,
        "upstream": {str(k): str(v) for k, v in sorted((upstream or {}).items())},
    }


def key_hash(key: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:32]

