"""Every content modality of the catalog in one object (`build_content`), and
the untrained content baseline (`ContentFeatures.raw_embedding`).

Shape legend:
    I  items, T text vector dim, G image vector dim
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from distill.encoders.cache import EncodeFn, EncodeStats
from distill.encoders.fields import FieldFeatures, encode_fields
from distill.encoders.image import encode_images
from distill.encoders.text import encode_texts
from features import schemas as S
from features.core.errors import DataError
from features.core.numeric import l2_normalise


@dataclass
class ContentFeatures:
    """Frozen content of every item, rows in items.parquet order."""

    item_ids: np.ndarray  # (I,) int64
    text: np.ndarray | None  # (I, T) L2-normalised, None when the text modality is off
    fields: FieldFeatures
    image: np.ndarray | None = None  # (I, G)
    image_mask: np.ndarray | None = None  # (I,) bool
    stats: dict[str, EncodeStats] = field(default_factory=dict)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    def raw_embedding(self, use_fields: bool = True) -> np.ndarray:
        """The untrained content baseline, (I, T [+ vocab]) L2-normalised.

        Text only: the MiniLM vector. With fields: [text, multi_hot / |multi_hot|]
        / sqrt(2), so text and fields weigh equally in cosine similarity.
        Images are left out: most catalogs here have none.
        """
        blocks = []
        if self.text is not None:
            blocks.append(l2_normalise(self.text))
        if use_fields and self.fields.vocab_size > 1:
            blocks.append(l2_normalise(self.fields.multi_hot()))
        if not blocks:
            raise ValueError("no content modality to build a raw embedding from")
        return l2_normalise(np.concatenate(blocks, 1))


def build_content(
    items: pl.DataFrame,
    kinds: dict[str, list[str]] | None = None,
    *,
    cache_dir: str | Path | None = None,
    use_text: bool = True,
    use_fields: bool = True,
    use_image: bool = True,
    n_buckets: int = 10,
    progress: bool = True,
    text_encoder: EncodeFn | None = None,
    image_encoder: EncodeFn | None = None,
) -> ContentFeatures:
    """Encode every item of an items.parquet frame (sorted by item_id).

    Raises DataError when the text modality is on and the frame has no usable
    `text` column (the features were built without item text).
    """
    kinds = kinds if kinds is not None else S.item_field_kinds(items.schema)
    text = None
    stats: dict[str, EncodeStats] = {}
    if use_text:
        if S.TEXT not in items.columns or items[S.TEXT].null_count() == items.height:
            raise DataError(
                "items have no text: the text encoder needs a `text` column "
                "(build features with an items file that has text, or set distill.student.use_text: false)",
                file=S.FILES["items"],
                column=S.TEXT,
            )
        text, stats["text"] = encode_texts(items[S.TEXT].to_list(), cache_dir=cache_dir, encoder=text_encoder, progress=progress)
    fields = encode_fields(items, kinds if use_fields else {}, n_buckets)
    image = mask = None
    if use_image and kinds.get("image"):
        image, mask, stats["image"] = encode_images(
            items[kinds["image"][0]].to_list(), cache_dir=cache_dir, encoder=image_encoder, progress=progress
        )
        if not mask.any():
            image = mask = None
    return ContentFeatures(items[S.ITEM_ID].to_numpy().astype(np.int64), text, fields, image, mask, stats)


__all__ = ["ContentFeatures", "build_content"]
