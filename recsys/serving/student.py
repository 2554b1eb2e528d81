"""The distilled student as a self-contained item encoder: items in, embeddings out.

    export_student(distill_out, features_dir, dest)   a distill stage's output -> a bundle folder
    StudentEncoder.load(dest).embed(items)            items DataFrame -> (n, D) float32, L2-normalised

The student reads content only (text, item fields, optionally images), so it
embeds items nobody has interacted with. Its field tokens must mean what they
meant in training: the bundle freezes the training catalog's field
vocabularies, numeric bucket edges and standardisation (`FieldEncoder`,
the encoder `distill.encoders.encode_fields` itself fits and applies; a test checks they
agree on the training catalog). A value the catalog never had becomes the
field's null token. Text goes through the same frozen MiniLM (offline, CPU).

Bundle: `student.pt` (the distill job's checkpoint, copied) and
`content.json` (the fields, their kinds and frozen encodings, the input columns).

Shape legend: I items, F tokens of one field, N numeric columns (2 per numeric field), D embedding dim.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from features import schemas as S
from distill.encoders.fields import FieldEncoder
from features.core.manifest import read_manifest

CONTENT_FILE = "content.json"
STUDENT_FILE = "student.pt"


def _kinds(features_dir: Path, items: pl.DataFrame) -> dict[str, list[str]]:
    manifest = read_manifest(features_dir) or {}
    return manifest.get("item_fields") or S.item_field_kinds(items.schema)


def export_student(distill_out: str | Path, features_dir: str | Path, dest: str | Path) -> Path:
    """Bundle the student of a distill stage's output folder (OUT/student/student.pt)
    with the frozen content encodings of the catalog it was trained on."""
    import torch

    distill_out, features_dir, dest = Path(distill_out), Path(features_dir), Path(dest)
    ckpt = distill_out / "student" / STUDENT_FILE
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    manifest = read_manifest(distill_out / "student") or {}
    _check_trained_on(manifest, features_dir, distill_out)
    items = pl.read_parquet(features_dir / S.FILES["items"]).sort(S.ITEM_ID)
    kinds = _kinds(features_dir, items)
    student_cfg = state["config"]
    n_buckets = int((manifest.get("config") or {}).get("n_buckets", 10))
    fields = FieldEncoder.fit(items, kinds if student_cfg.get("use_fields", True) else {}, n_buckets)
    inputs = ([S.TEXT] if student_cfg.get("use_text", True) else []) + fields.columns()
    content = {"fields": asdict(fields), "inputs": inputs, "dim": int(student_cfg["dim"])}
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(ckpt, dest / STUDENT_FILE)
    (dest / CONTENT_FILE).write_text(json.dumps(content, indent=2) + "\n")
    return dest


def _check_trained_on(manifest: dict, features_dir: Path, distill_out: Path) -> None:
    """UsageError unless `features_dir`'s items.parquet is the one the student
    trained on (its manifest's upstream fingerprint). The field vocabularies
    and numeric buckets are fitted on that catalog: refitted on a grown one,
    every vector changed (mean cosine 0.55 to the trained ones) without a word,
    and a new category value crashed (a probe, 2026-12-01)."""
    from features.core.errors import UsageError
    from features.core.fingerprint import file_fingerprint

    want = ((manifest.get("key") or {}).get("upstream") or {}).get(S.FILES["items"])
    items = features_dir / S.FILES["items"]
    if want is not None and items.is_file() and file_fingerprint(items) != want:
        raise UsageError(
            f"{items} is not the items file the student in {distill_out} trained on (another catalog, or the "
            "features were rebuilt): its field vocabularies and numeric buckets would be refitted and every vector "
            "would change; pass the features folder it trained on (new items go in the frame you embed: unseen "
            "field values read as missing)")


class StudentEncoder:
    """A bundle loaded for embedding: `.embed(items)` -> (I, D) float32."""

    def __init__(self, student: Any, fields: FieldEncoder, inputs: list[str]) -> None:
        self.student = student.eval()
        self.fields = fields
        self.inputs = inputs

    @classmethod
    def load(cls, bundle: str | Path) -> StudentEncoder:
        import torch

        from distill.config import StudentConfig
        from distill.student import ContentSpec, Student

        bundle = Path(bundle)
        state = torch.load(bundle / STUDENT_FILE, map_location="cpu", weights_only=True)
        content = json.loads((bundle / CONTENT_FILE).read_text())
        student = Student(StudentConfig(**state["config"]), ContentSpec(**state["spec"]), dict(state["teacher_dims"]),
                          tuple(state["matryoshka_dims"]))
        student.load_state_dict(state["state_dict"])
        return cls(student, FieldEncoder(**content["fields"]), list(content["inputs"]))

    def embed(self, items: pl.DataFrame | Any, cache_dir: str | Path | None = None) -> np.ndarray:
        """L2-normalised embeddings (I, D) of the rows of `items` (polars or
        pandas), which carry the content columns `self.inputs`."""
        from distill.encoders import ContentFeatures, encode_images, encode_texts
        from distill.student import ContentTensors

        frame = items if isinstance(items, pl.DataFrame) else pl.from_pandas(items)
        missing = [c for c in self.inputs if c not in frame.columns]
        if missing:
            raise ValueError(f"items lack content column(s) {missing}; the student reads {self.inputs}")
        cfg, spec = self.student.cfg, self.student.spec
        if frame.height == 0:
            return np.zeros((0, cfg.dim), np.float32)
        text = None
        if spec.text_dim:
            text, _ = encode_texts(frame[S.TEXT].to_list(), cache_dir=cache_dir, progress=False)
        image = mask = None
        if spec.image_dim:
            col = self.fields.kinds["image"][0]
            image, mask, _ = encode_images(frame[col].to_list(), cache_dir=cache_dir, progress=False)
            if not mask.any():  # no row has an image: zero rows of the trained width, as in training
                image = np.zeros((frame.height, spec.image_dim), np.float32)
        # the item id is no content input (any id, a string SKU too, gives the same vector): positions stand in for it
        cf = ContentFeatures(np.arange(frame.height, dtype=np.int64), text, self.fields.transform(frame), image, mask)
        return self.student.embed(ContentTensors.from_features(cf, cfg))


__all__ = ["CONTENT_FILE", "STUDENT_FILE", "FieldEncoder", "StudentEncoder", "export_student"]
