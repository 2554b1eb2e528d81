"""Test helper: make a job's folder hold an odd but consistent output.

Downstream jobs refuse an output whose bytes differ from its folder's
manifest (`features.reader.check_manifest`). A test that needs a features
folder with unusual contents (every label 0, say) to reach a downstream
check writes them with `rewrite_output`, which records the new fingerprint,
as the job would have had it produced them."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl

from features.core.fingerprint import file_fingerprint


def rewrite_output(path: str | Path, frame: pl.DataFrame) -> None:
    """Write `frame` to `path` and refresh that output's entry in its folder's manifest."""
    path = Path(path)
    frame.write_parquet(path)
    manifest = path.parent / "manifest.json"
    m = json.loads(manifest.read_text())
    m["outputs"][path.name].update(fingerprint=file_fingerprint(path), rows=frame.height)
    manifest.write_text(json.dumps(m, indent=2, sort_keys=True))
