"""Encoders: the cache avoids re-encoding, fields tokenise as documented,
MiniLM and EfficientNet-Lite0 give the expected vectors (real weights, offline)."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from distill.encoders import EmbeddingCache, build_content, encode_fields, encode_images, encode_texts
from features.core.errors import DataError


class CountingEncoder:
    """A fake text encoder: deterministic vectors, counts what it encodes."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def __call__(self, texts: list) -> np.ndarray:
        self.seen += texts
        return np.array([[len(t), t.count("a"), 1.0] for t in texts], dtype=np.float32)


def test_cache_hit_avoids_reencoding(tmp_path):
    enc = CountingEncoder()
    texts = ["alpha", "beta", "alpha", "gamma"]
    v1, s1 = encode_texts(texts, cache_dir=tmp_path, model="fake", encoder=enc, progress=False)
    assert sorted(enc.seen) == ["alpha", "beta", "gamma"]  # the duplicate is encoded once
    assert s1.n_encoded == 3 and not s1.cache_hit
    np.testing.assert_array_equal(v1[0], v1[2])
    v2, s2 = encode_texts(texts, cache_dir=tmp_path, model="fake", encoder=enc, progress=False)
    assert s2.cache_hit and len(enc.seen) == 3  # nothing re-encoded
    np.testing.assert_array_equal(v1, v2)
    _, s3 = encode_texts(["beta", "delta"], cache_dir=tmp_path, model="fake", encoder=enc, progress=False)
    assert s3.n_encoded == 1 and enc.seen[-1] == "delta"  # only the new text
    _, s4 = encode_texts(["beta"], cache_dir=tmp_path, model="other-model", encoder=enc, progress=False)
    assert s4.n_encoded == 1  # the model name is part of the key
    assert (tmp_path / "fake.parquet").is_file()


def test_corrupt_cache_is_rebuilt(tmp_path):
    cache = EmbeddingCache(tmp_path, "fake")
    cache.path.write_bytes(b"not parquet")
    enc = CountingEncoder()
    vecs, stats = encode_texts(["x"], cache_dir=tmp_path, model="fake", encoder=enc, progress=False)
    assert stats.n_encoded == 1 and vecs.shape == (1, 3)


def _cache_rows(tmp_path, rows: dict) -> None:
    pl.DataFrame({"key": list(rows), "embedding": pl.Series(list(rows.values()), dtype=pl.List(pl.Float32))}) \
        .write_parquet(EmbeddingCache(tmp_path, "fake").path)


def test_cached_rows_that_are_no_vectors_are_encoded_again(tmp_path, capsys):
    """A probe (2026-12-01): a NaN row in the cache gave the student (and the
    registered model) a NaN vector, a row of another length crashed with an
    unexpected ValueError, a file of another schema with a KeyError."""
    from distill.encoders.cache import content_key

    enc = CountingEncoder()
    good, _ = encode_texts(["ab", "cd", "ef", "gh"], cache_dir=tmp_path, model="fake", encoder=enc, progress=False)
    key = {t: content_key("fake", t) for t in ("ab", "cd", "ef", "gh")}
    _cache_rows(tmp_path, {key["ab"]: [np.nan, 1.0, 1.0], key["cd"]: [1.0, 2.0], key["ef"]: None, key["gh"]: [2.0, 0.0, 1.0]})
    enc.seen.clear()
    vecs, stats = encode_texts(["ab", "cd", "ef", "gh"], cache_dir=tmp_path, model="fake", encoder=enc, progress=False)
    np.testing.assert_array_equal(vecs, good)
    assert sorted(enc.seen) == ["ab", "cd", "ef"] and stats.n_encoded == 3  # gh's row was fine
    assert "3 of 4 cached vectors are null, of another length" in capsys.readouterr().err
    # a known encoder length: rows of another one, even all of them, are encoded again
    _cache_rows(tmp_path, {key["ab"]: [1.0, 2.0]})
    from distill.encoders.cache import cached_encode

    enc.seen.clear()
    vecs, _ = cached_encode(["ab"], [key["ab"]], enc, EmbeddingCache(tmp_path, "fake"), 8, False, "t", dim=3)
    assert enc.seen == ["ab"] and vecs.shape == (1, 3)
    # an L2-normalising encoder: a zero row, or one of 1e30, is no vector of it (a probe of the fix)
    unit = lambda texts: np.array([[0.6, 0.8, 0.0] for _ in texts], np.float32)  # noqa: E731
    _cache_rows(tmp_path, {key["ab"]: [0.0, 0.0, 0.0], key["cd"]: [1e30, 0.0, 0.0], key["ef"]: [0.0, 1.0, 0.0]})
    vecs, stats = cached_encode(["ab", "cd", "ef"], [key[t] for t in ("ab", "cd", "ef")], unit,
                                EmbeddingCache(tmp_path, "fake"), 8, False, "t", dim=3, unit_norm=True)
    assert stats.n_encoded == 2 and vecs[2].tolist() == [0.0, 1.0, 0.0] and "or not of norm 1" in capsys.readouterr().err
    pl.DataFrame({"k": ["x"]}).write_parquet(EmbeddingCache(tmp_path, "fake").path)  # another file under its name
    vecs, stats = encode_texts(["ab"], cache_dir=tmp_path, model="fake", encoder=enc, progress=False)
    assert stats.n_encoded == 1 and "not an embedding cache" in capsys.readouterr().err


def test_minilm_vectors_and_second_run_hits_cache(syn_content, synthetic_features, encoder_cache):
    assert syn_content.text.shape == (400, 384)
    np.testing.assert_allclose(np.linalg.norm(syn_content.text, axis=1), 1.0, atol=1e-4)
    items = pl.read_parquet(synthetic_features / "items.parquet")
    again = build_content(items, cache_dir=encoder_cache / "encoders", progress=False)
    assert again.stats["text"].cache_hit
    np.testing.assert_array_equal(again.text, syn_content.text)
    # texts naming the same planted directions are closer than unrelated ones
    t = syn_content.text
    assert (t @ t.T).mean() < 0.9


def test_encode_fields_tokens():
    items = pl.DataFrame(
        {
            "item_id": [1, 2, 3],
            "category": ["b", None, "a"],
            "tags": [["x", "y"], [], None],
            "year": [1990, None, 2000],
        },
        schema_overrides={"tags": pl.List(pl.String)},
    )
    f = encode_fields(items, {"categorical": ["category"], "multi": ["tags"], "numeric": ["year"]}, n_buckets=2)
    # ids: category null=1, a=2, b=3; tags null=4, x=5, y=6; year null=7, buckets 8, 9
    assert f.names == ["category", "tags", "year"]
    np.testing.assert_array_equal(f.tokens[0][:, 0], [3, 1, 2])
    np.testing.assert_array_equal(f.tokens[1], [[5, 6], [4, 0], [4, 0]])
    np.testing.assert_array_equal(f.tokens[2][:, 0], [8, 7, 9])
    assert f.vocab_size == 10
    # numeric: standardised value and null flag
    np.testing.assert_allclose(f.numeric, [[-1, 0], [0, 1], [1, 0]])
    mh = f.multi_hot()
    np.testing.assert_allclose(mh[0, [3, 5, 6, 8]], [1, 1 / np.sqrt(2), 1 / np.sqrt(2), 1])


def test_items_without_text_are_a_data_error():
    items = pl.DataFrame({"item_id": [1, 2], "text": [None, None]}, schema_overrides={"text": pl.String})
    with pytest.raises(DataError, match="text"):
        build_content(items, {}, progress=False)


def _png(path, rgb):
    from PIL import Image

    arr = np.zeros((40, 60, 3), dtype=np.uint8)
    arr[:, :30] = rgb
    arr[:, 30:] = [255 - c for c in rgb]
    Image.fromarray(arr).save(path)
    return str(path)


def test_efficientnet_features_on_generated_images(tmp_path):
    red = _png(tmp_path / "red.png", (220, 20, 20))
    red2 = _png(tmp_path / "red_copy.png", (220, 20, 20))  # same pixels, another file
    blue = _png(tmp_path / "blue.png", (10, 30, 230))
    paths = [red, None, blue, red2]
    vecs, mask, stats = encode_images(paths, cache_dir=tmp_path / "cache", progress=False)
    assert vecs.shape == (4, 1280) and mask.tolist() == [True, False, True, True]
    assert np.isfinite(vecs).all() and np.all(vecs[1] == 0)
    np.testing.assert_allclose(vecs[0], vecs[3], rtol=1e-5)  # keyed by content, encoded once
    assert stats.n_encoded == 2
    assert np.linalg.norm(vecs[0] - vecs[2]) > 1e-3
    _, _, again = encode_images(paths, cache_dir=tmp_path / "cache", progress=False)
    assert again.cache_hit
    with pytest.raises(DataError, match="missing.png"):
        encode_images([str(tmp_path / "missing.png")], cache_dir=tmp_path / "cache", progress=False)


def test_image_modality_reaches_the_student(tmp_path, syn_content):
    """items with an image_path column get image features and a third gate."""
    import torch

    from distill.student import ContentSpec, ContentTensors, Student, StudentConfig

    paths = [_png(tmp_path / f"{i}.png", (20 * i, 100, 50)) for i in range(3)]
    items = pl.DataFrame(
        {"item_id": [1, 2, 3], "text": ["a red film", "a blue film", "no image"], "genre": ["x", "y", "x"], "image_path": [paths[0], paths[1], None]}
    )
    cf = build_content(items, cache_dir=tmp_path / "cache", progress=False, text_encoder=CountingEncoder())
    assert cf.image is not None and cf.image_mask.tolist() == [True, True, False]
    x = ContentTensors.from_features(cf, StudentConfig())
    s = Student(StudentConfig(dim=8, hidden_dim=8), ContentSpec.of(x, cf.fields.vocab_size))
    s.eval()
    gates = s.gates(x)  # (3, M): text, fields, image
    assert gates.shape[1] == 3 and gates[2, -1] == 0 and torch.all(gates[:2, -1] > 0)


def test_a_numeric_value_far_outside_the_catalog_stays_finite():
    """A new item with popularity_rank 1e25 made the served student's embedding
    all NaN (2026-11-30): standardised values are clipped to +-Z_CLIP, which no
    value of the catalog the stats came from can reach (|z| <= sqrt(n - 1))."""
    import polars as pl

    from distill.encoders.fields import Z_CLIP, FieldEncoder

    catalog = pl.DataFrame({"item_id": [1, 2, 3, 4], "rank": [1.0, 2.0, 3.0, 1000.0]})
    enc = FieldEncoder.fit(catalog, {"categorical": [], "multi": [], "numeric": ["rank"], "image": []})
    train = enc.transform(catalog).numeric[:, 0]
    assert np.abs(train).max() < Z_CLIP  # the clip leaves the catalog's own values alone
    new = enc.transform(pl.DataFrame({"item_id": [9], "rank": [1e25]})).numeric
    assert np.isfinite(new).all() and new[0, 0] == np.float32(Z_CLIP)
