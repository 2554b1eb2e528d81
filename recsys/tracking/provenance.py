"""What made a run: the plugin's code version and the git state of its checkout.

Every run is tagged `code_version` and `code_hash` (the plugin's version and
a hash of its own source files), and `git_commit` and `git_dirty` when the
plugin itself lives in a git checkout. The git state is informational; the
stage key (`features.core.provenance.stage_key`) is what decides reuse.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from features.core.provenance import (
    DIST_NAME,
    PACKAGES,
    REUSE_KEY_VERSION,
    _plugin_code,
    as_mapping,
    fingerprint,
    hash_sources,
    key_hash,
    source_files,
    stage_key,
)

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


__all__ = [
    "DIST_NAME", "PACKAGES", "REUSE_KEY_VERSION", "CodeVersion", "GitInfo", "as_mapping", "code_version",
    "fingerprint", "git_info", "hash_sources", "key_hash", "source_files", "stage_key", "_plugin_code",
]
