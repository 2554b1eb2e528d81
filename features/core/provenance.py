"""What identifies a computation: the plugin's code, a stage's key.

A stage's key is (stage name, hash of its params, plugin version + hash of
the plugin's own source files, upstream fingerprints). A job writes it into
its output folder's manifest and skips the work when the folder already
holds a manifest with the same key and intact outputs
(`features.core.manifest.is_up_to_date`); the MLflow stage run is tagged
`reuse_key` = `key_hash(key)`. That is the one reuse mechanism.

The code is the plugin's own (the `.py` files of `recsys`, `features` and
`distill`, wherever they are installed), never the working directory's
repository: editing one source file changes every key. When the source files
cannot be found the code hash is "" and nothing is reused.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from features.core.config import config_hash, to_dict

REUSE_KEY_VERSION = 3  # 3: one key for manifests and MLflow runs
DIST_NAME = "recsys-plugin"
PACKAGES = ("recsys", "features", "distill")  # the plugin's code: what a key covers


class Code(Protocol):
    version: str
    source_hash: str


@dataclasses.dataclass(frozen=True)
class PluginCode:
    """The plugin's version and source hash ("" when unknown)."""

    version: str = "unknown"
    source_hash: str = ""


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


def plugin_code() -> PluginCode:
    """The running plugin's version and source hash (computed once per process)."""
    return PluginCode(*_plugin_code())


def fingerprint(upstream: Mapping[str, str] | None) -> str:
    """One fingerprint for a stage's inputs: hash of its upstream fingerprints."""
    if not upstream:
        return "none"
    return config_hash({str(k): str(v) for k, v in upstream.items()})


def as_mapping(params: Any) -> dict[str, Any]:
    if params is None:
        return {}
    if dataclasses.is_dataclass(params) and not isinstance(params, type):
        return to_dict(params)
    if isinstance(params, Mapping):
        return {k: as_mapping(v) if dataclasses.is_dataclass(v) and not isinstance(v, type) else v for k, v in params.items()}
    raise TypeError(f"params must be a mapping or a config dataclass, got {type(params).__name__}")


def stage_key(stage: str, params: Any, upstream: Mapping[str, str] | None, code: Code | None = None) -> dict[str, Any]:
    """What must match for a stage to be reused (see the module docstring).
    `code`: the running plugin's when None."""
    code = code if code is not None else plugin_code()
    return {
        "v": REUSE_KEY_VERSION,
        "stage": stage,
        "params_hash": config_hash(as_mapping(params)),
        "code_version": code.version,
        "code_hash": code.source_hash,
        "upstream": {str(k): str(v) for k, v in sorted((upstream or {}).items())},
    }


def key_hash(key: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:32]

