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


def test_a_16_bit_image_reads_as_the_same_picture_as_its_8_bit_copy(tmp_path):
    """A probe (2026-12-01): PIL's convert("RGB") clips 16-bit grey at 255, so
    a 16-bit PNG read as an almost white image (cosine 0.33 to its 8-bit copy)."""
    from PIL import Image

    from distill.encoders import load_image

    grey = (np.add.outer(np.arange(40), np.arange(60)) * 2).astype(np.uint8)  # (40, 60)
    Image.fromarray(grey).save(tmp_path / "g8.png")
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I;16")
    np.testing.assert_allclose(load_image(tmp_path / "g16.png"), load_image(tmp_path / "g8.png"), atol=1e-6)
    Image.fromarray(grey.astype(np.float32) / 255.0, mode="F").save(tmp_path / "f.tiff")  # floats in [0, 1]
    np.testing.assert_allclose(load_image(tmp_path / "f.tiff"), load_image(tmp_path / "g8.png"), atol=1e-6)


def test_an_oversized_image_is_a_data_error_naming_the_file(tmp_path, monkeypatch):
    """PIL's decompression-bomb guard raised past the DataError handling."""
    from PIL import Image

    from distill.encoders import load_image
    from distill.encoders.image import image_fingerprint

    path = _png(tmp_path / "big.png", (1, 2, 3))  # 40 x 60 = 2,400 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # over twice the limit: PIL refuses
    for read in (load_image, lambda p: image_fingerprint([None, p])):
        with pytest.raises(DataError, match=r"big\.png.*too large"):
            read(path)


def test_image_fingerprint_follows_the_bytes_not_the_path(tmp_path):
    from distill.encoders.image import image_fingerprint

    a, b = _png(tmp_path / "a.png", (200, 0, 0)), _png(tmp_path / "b.png", (200, 0, 0))
    assert image_fingerprint([a, None]) == image_fingerprint([b, None])  # same pixels
    assert image_fingerprint([a, None]) != image_fingerprint([None, a])  # another item has it
    before = image_fingerprint([a])
    _png(tmp_path / "a.png", (0, 200, 0))
    assert image_fingerprint([a]) != before
    (tmp_path / "c.png").write_text("not an image")
    with pytest.raises(DataError, match="c.png"):
        image_fingerprint([str(tmp_path / "c.png")])


def test_a_numeric_field_of_huge_values_standardises_without_overflow():
    """A probe (2026-12-01): a price column with two values of 1e308 (a sentinel)
    summed to inf: every item's standardised value was NaN and training
    stopped as "diverged; lower distill.lr". One of 1e155 made the std inf and
    every value 0, silently."""
    from distill.encoders.fields import FieldEncoder

    for huge in (1e308, 1e155):
        price = np.arange(100) + 0.5
        price[:2] = huge
        catalog = pl.DataFrame({"item_id": np.arange(100), "price": price})
        enc = FieldEncoder.fit(catalog, {"numeric": ["price"]})
        z = enc.transform(catalog).numeric[:, 0]
        assert np.isfinite(z).all()
        assert z[0] > 1 and z[2] < 0  # the outliers stand out (the rest keep their order in the bucket tokens)
    ordinary = pl.DataFrame({"item_id": [1, 2, 3], "price": [1.0, 2.0, 3.0]})
    assert FieldEncoder.fit(ordinary, {"numeric": ["price"]}).numeric["price"][1:] == [2.0, float(np.std([1.0, 2, 3]))]
    # bucket edges between -1e308 and 1e308 interpolated to +-inf (a probe, 2026-12-01)
    extremes = pl.DataFrame({"item_id": [1, 2, 3, 4], "price": [-1e308, -1e308, 1e308, 1e308]})
    edges = FieldEncoder.fit(extremes, {"numeric": ["price"]}).numeric["price"][0]
    assert edges and np.isfinite(edges).all() and set(edges) <= {-1e308, 1e308}, edges
    wide = pl.DataFrame({"item_id": np.arange(100), "price": np.arange(100.0) + 0.5})  # ordinary data: interpolated as before
    assert FieldEncoder.fit(wide, {"numeric": ["price"]}).numeric["price"][0] == np.quantile(
        np.arange(100.0) + 0.5, np.linspace(0, 1, 11)[1:-1]).tolist()


def test_the_exported_student_embeds_items_without_images(tmp_path):
    """A probe (2026-12-01): a student trained with images failed on a frame in
    which no item had one (`mat1 and mat2 shapes cannot be multiplied (1x0 and 1280x32)`)."""
    import torch

    from distill.encoders.fields import FieldEncoder
    from distill.student import ContentSpec, ContentTensors, Student, StudentConfig
    from recsys.serving.student import StudentEncoder

    paths = [_png(tmp_path / f"{i}.png", (20 * i, 100, 50)) for i in range(3)]
    items = pl.DataFrame({"item_id": [1, 2, 3], "genre": ["x", "y", "x"], "image_path": [paths[0], paths[1], None]})
    kinds = {"categorical": ["genre"], "image": ["image_path"]}
    cf = build_content(items, kinds, cache_dir=tmp_path / "cache", progress=False, use_text=False)
    cfg = StudentConfig(dim=8, hidden_dim=8)
    x = ContentTensors.from_features(cf, cfg)
    torch.manual_seed(0)
    student = Student(cfg, ContentSpec.of(x, cf.fields.vocab_size))
    encoder = StudentEncoder(student, FieldEncoder.fit(items, kinds), ["genre", "image_path"])
    full = encoder.embed(items, cache_dir=tmp_path / "cache")
    alone = encoder.embed(items.filter(pl.col("item_id") == 3), cache_dir=tmp_path / "cache")
    assert alone.shape == (1, 8) and np.isfinite(alone).all()
    np.testing.assert_allclose(alone[0], full[2], rtol=1e-5, atol=1e-6)  # as in a frame with images


def test_the_image_cache_key_holds_the_preprocessing_version(tmp_path, monkeypatch):
    """A probe (2026-12-01): after the 16-bit fix the cache still served the old,
    white-clipped vectors (keyed by model and bytes only)."""
    import distill.encoders.image as image

    path = _png(tmp_path / "a.png", (5, 6, 7))
    fake = lambda paths: np.ones((len(paths), 4), np.float32)  # noqa: E731
    _, _, first = encode_images([path], cache_dir=tmp_path / "c", encoder=fake, progress=False)
    _, _, again = encode_images([path], cache_dir=tmp_path / "c", encoder=fake, progress=False)
    assert first.n_encoded == 1 and again.n_encoded == 0
    monkeypatch.setattr(image, "PREPROCESSING", image.PREPROCESSING + "-next")
    _, _, bumped = encode_images([path], cache_dir=tmp_path / "c", encoder=fake, progress=False)
    assert bumped.n_encoded == 1
