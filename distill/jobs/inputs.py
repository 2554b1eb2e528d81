"""One distill job's inputs, read and checked once: the features folder (its
manifest and tables), the cold-start split, the content features."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from distill import evaluate as E
from distill.encoders import ContentFeatures, build_content, default_cache_dir, empty_texts
from distill.encoders.image import image_fingerprint
from distill.jobs.artifacts import FEATURES_JOB
from distill.config import DistillConfig
from features import schemas as S
from features.core.errors import ConfigError, DataError, UsageError
from features.core.manifest import read_manifest
from features.core.paths import check_output
from features.reader import read_features_table

REQUIRED = {
    "interactions": [S.USER_ID, S.ITEM_ID, S.LABEL, S.SPLIT, S.HIST_END, S.POS_HIST_END, S.POS_HIST_LEN],
    "sequences": [S.USER_ID, S.ITEM_IDS, S.POS_ITEM_IDS],
    "items": [S.ITEM_ID, S.N_TRAIN],
}


@dataclass
class DistillInputs:
    """One job's inputs, read once: features, the cold-start split, content."""

    folder: Path
    upstream: dict[str, str]  # features output file -> fingerprint
    items: pl.DataFrame
    kinds: dict[str, list[str]]
    distill: DistillConfig  # seed resolved
    data: E.ColdStartData
    _content: ContentFeatures | None = None
    timings: dict[str, float] = field(default_factory=dict)
    images: str | None = None  # fingerprint of the image files' bytes, when the student reads images

    @property
    def content_upstream(self) -> dict[str, str]:
        """`upstream` and the image bytes: the key of every stage that encodes content."""
        return self.upstream if self.images is None else {**self.upstream, "images": self.images}

    @property
    def protocol(self) -> dict[str, Any]:
        c = self.distill
        return {
            "holdout_frac": c.holdout_frac,
            "pseudo_cold_frac": c.pseudo_cold_frac,
            "seed": c.seed,
            "history_len": c.history_len,
            "query_len": c.query_len,
            "select_k": c.select_k,
        }

    def content(self) -> ContentFeatures:
        if self._content is None:
            t0 = time.perf_counter()
            c = self.distill
            self._content = build_content(
                self.items,
                self.kinds,
                cache_dir=c.cache_dir or None,
                use_text=c.student.use_text,
                use_fields=c.student.use_fields,
                use_image=c.student.use_image,
                n_buckets=c.n_buckets,
                progress=c.progress,
            )
            self.timings["encode_s"] = time.perf_counter() - t0
        return self._content


def _check_text(items: pl.DataFrame, file: Path, max_share: float, log: Callable[[str], None]) -> None:
    """Refuse items whose text is missing or mostly empty (the "content"
    student would learn from nothing); warn, with counts, when some are."""
    hint = (
        "build the features from an items file with a text column (`--items FILE --text-column NAME`), "
        "or set distill.student.use_text: false"
    )
    if S.TEXT not in items.columns:
        raise DataError(f"items have no text column, which the text encoder needs: {hint}", file=str(file), column=S.TEXT)
    null, blank = empty_texts(items[S.TEXT].to_list())
    n, empty = items.height, null + blank
    counts = f"{empty} of {n} items ({empty / max(n, 1):.0%}) have no text ({null} null, {blank} blank)"
    if empty == n:
        raise DataError(f"{counts}: every item's text is empty, so a text student would learn from nothing; {hint}",
                        file=str(file), column=S.TEXT)
    if empty / max(n, 1) > max_share:
        raise DataError(
            f"{counts}, more than distill.max_empty_text_share {max_share:g} allows: a text student would learn from "
            f"nothing; {hint}, or raise distill.max_empty_text_share",
            file=str(file),
            column=S.TEXT,
        )
    if empty:
        log(
            f"warning: {file}: column {S.TEXT!r}: {counts}; they all get the same text vector "
            f"(refused above distill.max_empty_text_share {max_share:g})"
        )


def _check_cache_dir(cache_dir: str) -> None:
    """The encoder cache folder must be creatable: checked before any work."""
    from features.core.paths import check_output

    where = "distill.cache_dir" if cache_dir else "the encoder cache ($RECSYS_CACHE_DIR/encoders)"
    check_output(cache_dir or default_cache_dir(), {}, flag=where)


def load_inputs(features_dir: str | Path, cfg: DistillConfig, seed: int, log: Callable[[str], None] = print,
                out_dir: str | Path | None = None) -> DistillInputs:
    """The features folder's tables, checked, and the cold-start split of
    them; the seed of `cfg` filled in from `seed` when None. `out_dir`, the
    job's output, may not overlap the features folder (UsageError: writing
    there would destroy the input), as the CLI checks for --out."""
    if out_dir is not None:
        check_output(out_dir, {"features_dir": features_dir})
    folder = Path(features_dir)
    if not folder.is_dir():
        raise UsageError(f"features folder {folder} does not exist: run `recsys features build --out {folder}` first")
    manifest = read_manifest(folder)
    if manifest is None:
        raise UsageError(f"{folder} has no readable manifest.json, so it is not a features folder: run `recsys features build --out {folder}`")
    if manifest.get("job") != FEATURES_JOB:
        raise UsageError(f"{folder} holds the output of {manifest.get('job')!r}, not of `recsys features build`")
    inter, seqs, items = (read_features_table(folder, n, REQUIRED[n]) for n in ("interactions", "sequences", "items"))
    if cfg.student.use_text:
        _check_text(items, folder / S.FILES["items"], cfg.max_empty_text_share, log)
        _check_cache_dir(cfg.cache_dir)
    inter_file = str(folder / S.FILES["interactions"])
    if inter.filter((pl.col(S.SPLIT) == "train") & (pl.col(S.LABEL) == 1)).height == 0:
        raise DataError("no positive train events: nothing to learn from", file=inter_file, column=S.LABEL)
    cfg = with_seed(cfg, seed)
    data = E.prepare_cold_start(
        inter, seqs, items, holdout_frac=cfg.holdout_frac, pseudo_cold_frac=cfg.pseudo_cold_frac, seed=cfg.seed, history_len=cfg.history_len
    )
    if not any(len(s) >= 2 for s in data.train_sequences):
        raise DataError(
            f"no user has 2 or more train positives once {data.counts['n_items_heldout'] + data.counts['n_items_pseudo_cold']} "
            f"of {data.n_items} items are held out (distill.holdout_frac {cfg.holdout_frac}, distill.pseudo_cold_frac "
            f"{cfg.pseudo_cold_frac}): the sequence teacher has nothing to learn from; "
            "use more data, or a smaller distill.holdout_frac / pseudo_cold_frac",
            file=inter_file,
            column=S.LABEL,
        )
    upstream = {k: v.get("fingerprint") for k, v in manifest.get("outputs", {}).items()}
    kinds = manifest.get("item_fields") or S.item_field_kinds(items.schema)
    st = cfg.student  # the student needs one enabled modality the catalog has: checked before the teachers train
    has = {"use_text": st.use_text, "use_fields": st.use_fields and any(kinds.get(k) for k in ("categorical", "multi", "numeric")),
           "use_image": st.use_image and bool(kinds.get("image"))}
    if not any(has.values()):
        raise ConfigError(
            f"distill.student: no enabled modality is in {folder / S.FILES['items']} (use_text {st.use_text}; use_fields "
            f"{st.use_fields}, fields {sum(len(kinds.get(k) or []) for k in ('categorical', 'multi', 'numeric'))}; use_image "
            f"{st.use_image}, image columns {len(kinds.get('image') or [])}): switch on distill.student.use_text"
        )
    items = items.sort(S.ITEM_ID)
    images = image_fingerprint(items[kinds["image"][0]].to_list()) if has["use_image"] else None
    return DistillInputs(folder, upstream, items, kinds, cfg, data, images=images)


def with_seed(cfg: Any, seed: int) -> Any:
    """The config with its seed filled in: None means the caller's (pipeline) seed."""
    return cfg if cfg.seed is not None else dataclasses.replace(cfg, seed=seed)


__all__ = ["REQUIRED", "DistillInputs", "load_inputs", "with_seed"]
