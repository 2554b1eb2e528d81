"""The distilled student as a self-contained item encoder: items in, embeddings out.

    export_student(distill_out, features_dir, dest)   a distill stage's output -> a bundle folder
    StudentEncoder.load(dest).embed(items)            items DataFrame -> (n, D) float32, L2-normalised

The student reads content only (text, item fields, optionally images), so it
embeds items nobody has interacted with. Its field tokens must mean what they
meant in training: the bundle freezes the training catalog's field
vocabularies, numeric bucket edges and standardisation (`FrozenFields`,
fitted exactly like `distill.encoders.encode_fields`; a test checks the two
agree on the training catalog). A value the catalog never had becomes the
field's null token. Text goes through the same frozen MiniLM (offline, CPU).

Bundle: `student.pt` (the distill job's checkpoint, copied) and
`content.json` (the fields, their kinds and frozen encodings, the input columns).

Shape legend: I items, F tokens of one field, N numeric columns (2 per numeric field), D embedding dim.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from features import schemas as S
from features.core.manifest import read_manifest

CONTENT_FILE = "content.json"
STUDENT_FILE = "student.pt"


@dataclass
class FrozenFields:
    """Item-field encodings fitted on the training catalog (see module docstring)."""

    kinds: dict[str, list[str]]
    values: dict[str, list[str]] = field(default_factory=dict)  # categorical / multi field -> sorted values
    numeric: dict[str, list[Any]] = field(default_factory=dict)  # numeric field -> [edges, mean, std]

    @classmethod
    def fit(cls, items: pl.DataFrame, kinds: dict[str, list[str]], n_buckets: int = 10) -> FrozenFields:
        out = cls({k: list(v) for k, v in kinds.items()})
        for name in kinds.get("categorical", []):
            out.values[name] = sorted(v for v in items[name].cast(pl.String).unique().to_list() if v is not None)
        for name in kinds.get("multi", []):
            out.values[name] = sorted({x for v in items[name].to_list() if v is not None for x in v if x is not None})
        for name in kinds.get("numeric", []):
            x = items[name].cast(pl.Float64).to_numpy()
            vals = x[np.isfinite(x)]
            if len(vals):
                edges = np.unique(np.quantile(vals, np.linspace(0, 1, n_buckets + 1)[1:-1]))
                out.numeric[name] = [edges.tolist(), float(vals.mean()), float(vals.std()) or 1.0]
            else:
                out.numeric[name] = [[], 0.0, 1.0]
        return out

    def columns(self) -> list[str]:
        return [c for kind in ("categorical", "multi", "numeric", "image") for c in self.kinds.get(kind, [])]

    def transform(self, items: pl.DataFrame) -> Any:
        """`FieldFeatures` of `items` with the frozen encodings (ids as in training)."""
        from distill.encoders import FieldFeatures

        names, tokens, vocab, numeric_cols = [], [], {}, []
        next_id, n = 1, items.height
        for name in self.kinds.get("categorical", []):
            values = self.values[name]
            ids = {v: next_id + 1 + i for i, v in enumerate(values)}
            col = items[name].cast(pl.String).to_list() if name in items.columns else [None] * n
            tokens.append(np.array([ids.get(v, next_id) for v in col], dtype=np.int64)[:, None])  # (I, 1)
            names.append(name)
            vocab[name] = ["<null>", *values]
            next_id += 1 + len(values)
        for name in self.kinds.get("multi", []):
            values = self.values[name]
            ids = {v: next_id + 1 + i for i, v in enumerate(values)}
            raw = items[name].to_list() if name in items.columns else [None] * n
            lists = [[ids[x] for x in (v or []) if x in ids] for v in raw]
            width = max(1, max((len(v) for v in lists), default=1))
            tok = np.zeros((n, width), dtype=np.int64)  # (I, F)
            for r, row in enumerate(lists):
                row = row or [next_id]  # empty or unknown values only -> the null token
                tok[r, : len(row)] = row
            tokens.append(tok)
            names.append(name)
            vocab[name] = ["<null>", *values]
            next_id += 1 + len(values)
        for name in self.kinds.get("numeric", []):
            edges_l, mean, std = self.numeric[name]
            edges = np.asarray(edges_l, dtype=np.float64)
            x = items[name].cast(pl.Float64).to_numpy() if name in items.columns else np.full(n, np.nan)
            null = ~np.isfinite(x)
            bucket = np.where(null, 0, 1 + np.searchsorted(edges, np.where(null, 0, x), side="right"))
            tokens.append((next_id + bucket).astype(np.int64)[:, None])
            names.append(name)
            vocab[name] = ["<null>", *[f"<= {e:g}" for e in edges], f"> {edges[-1]:g}" if len(edges) else "all"]
            next_id += 2 + len(edges)
            numeric_cols += [np.where(null, 0.0, (x - mean) / std), null.astype(np.float64)]
        numeric = np.stack(numeric_cols, 1).astype(np.float32) if numeric_cols else np.zeros((n, 0), np.float32)
        return FieldFeatures(names, tokens, numeric, next_id, vocab)


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
    items = pl.read_parquet(features_dir / S.FILES["items"]).sort(S.ITEM_ID)
    kinds = _kinds(features_dir, items)
    student_cfg = state["config"]
    manifest = read_manifest(distill_out / "student") or {}
    n_buckets = int((manifest.get("config") or {}).get("n_buckets", 10))
    fields = FrozenFields.fit(items, kinds if student_cfg.get("use_fields", True) else {}, n_buckets)
    inputs = ([S.TEXT] if student_cfg.get("use_text", True) else []) + fields.columns()
    content = {"fields": asdict(fields), "inputs": inputs, "dim": int(student_cfg["dim"])}
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(ckpt, dest / STUDENT_FILE)
    (dest / CONTENT_FILE).write_text(json.dumps(content, indent=2) + "\n")
    return dest


class StudentEncoder:
    """A bundle loaded for embedding: `.embed(items)` -> (I, D) float32."""

    def __init__(self, student: Any, fields: FrozenFields, inputs: list[str]) -> None:
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
        return cls(student, FrozenFields(**content["fields"]), list(content["inputs"]))

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
        text = None
        if spec.text_dim:
            text, _ = encode_texts(frame[S.TEXT].to_list(), cache_dir=cache_dir, progress=False)
        image = mask = None
        if spec.image_dim:
            col = self.fields.kinds["image"][0]
            image, mask, _ = encode_images(frame[col].to_list(), cache_dir=cache_dir, progress=False)
        ids = frame[S.ITEM_ID].to_numpy() if S.ITEM_ID in frame.columns else np.arange(frame.height)
        cf = ContentFeatures(np.asarray(ids, np.int64), text, self.fields.transform(frame), image, mask)
        return self.student.embed(ContentTensors.from_features(cf, cfg))


__all__ = ["CONTENT_FILE", "STUDENT_FILE", "FrozenFields", "StudentEncoder", "export_student"]
