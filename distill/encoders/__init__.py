"""Frozen content encoders: text (MiniLM, text.py), item fields (categorical,
multi-valued, numeric; fields.py) and, when items carry an `image_path`,
images (EfficientNet-Lite0, image.py); content.py builds all of them for a
catalog.

Nothing here is trained: the student (distill/student.py) learns on top of
these features. Text and image vectors are expensive, so they are cached in
parquet (cache.py): a rerun encodes only what is new.

Shape legend:
    I  items
    T  text vector dim (384 for MiniLM)
    F  field tokens of one field per item (padded with 0)
    N  numeric fields (2 columns each: standardised value, null flag)
    G  image vector dim (1280 for EfficientNet-Lite0)
"""

from __future__ import annotations

from distill.encoders.cache import (
    DEFAULT_CACHE_DIR,
    EmbeddingCache,
    EncodeFn,
    EncodeStats,
    content_key,
    default_cache_dir,
)
from distill.encoders.content import ContentFeatures, build_content
from distill.encoders.fields import FieldFeatures, encode_fields
from distill.encoders.image import IMAGE_MODEL, IMAGE_SIZE, efficientnet_encoder, encode_images, load_image
from distill.encoders.text import TEXT_MODEL, empty_texts, encode_texts, minilm_encoder

__all__ = [
    "TEXT_MODEL",
    "IMAGE_MODEL",
    "IMAGE_SIZE",
    "DEFAULT_CACHE_DIR",
    "EncodeFn",
    "EmbeddingCache",
    "EncodeStats",
    "ContentFeatures",
    "FieldFeatures",
    "build_content",
    "content_key",
    "default_cache_dir",
    "efficientnet_encoder",
    "encode_fields",
    "encode_images",
    "empty_texts",
    "encode_texts",
    "load_image",
    "minilm_encoder",
]
