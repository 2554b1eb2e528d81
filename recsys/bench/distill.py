"""`python -m recsys.bench distill`: student training samples/s and text
encoding items/s.

Encoding: the catalog's item texts through MiniLM into a fresh temporary
cache (a miss; the model load is timed apart), then the same call again (a
hit, served from the parquet cache). `default_cache_hit` says whether the
pipeline's own cache (~/.cache/recsys-plugin/encoders or $RECSYS_CACHE_DIR)
already holds these texts, i.e. whether `recsys distill eval` will skip
encoding. Training: both teachers (short), then the student for --epochs
epochs with the default config; samples/s counts sequence-to-item examples
per second of optimisation steps (valid scoring excluded), median of
--repeats runs, on one torch thread as the jobs use.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from recsys.bench.common import apply_quick, machine_info, nonnegative_int, positive_int, print_table, write_json


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m recsys.bench distill", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", choices=["movielens100k", "synthetic"], default="movielens100k")
    p.add_argument("--epochs", type=positive_int, default=2, help="student epochs per timed run")
    p.add_argument("--repeats", type=positive_int, default=3, help="timed student runs; the median is reported")
    p.add_argument("--encode-items", type=nonnegative_int, default=0, help="texts to encode (0: the whole catalog)")
    p.add_argument("--quick", action="store_true", help="tiny smoke run (tests): synthetic, 32 texts, 1 epoch, 1 repeat")
    p.add_argument("--out", default="bench/results", help="folder for distill.json")
    args = p.parse_args(argv)
    if args.quick:
        apply_quick(p, args, {"source": "synthetic", "epochs": 1, "repeats": 1, "encode_items": 32})

    import dataclasses

    import numpy as np
    import polars as pl
    import torch

    from distill import encoders as enc
    from distill.evaluate import prepare_cold_start
    from distill.student import ContentSpec, ContentTensors
    from distill.teachers import ID2ItemConfig, ID2ItemTeacher, Seq2ItemConfig, Seq2ItemTeacher
    from distill.train import DistillConfig, TeacherTarget, fit_student
    from features import schemas as S
    from features.jobs import FeaturesConfig, build_features
    from features.sources import SyntheticConfig

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        fcfg = FeaturesConfig()
        if args.source == "synthetic":
            fcfg = FeaturesConfig(source="synthetic", synthetic=SyntheticConfig(users=100, items=200, max_events=60, seed=0))
        build_features(fcfg, tmp / "features", log=lambda _m: None)
        items = pl.read_parquet(tmp / "features" / S.FILES["items"])
        texts = items[S.TEXT].to_list()[: args.encode_items or None]

        # --- encoding: miss (fresh cache), then hit
        keys = [enc.content_key(enc.TEXT_MODEL, t) for t in texts]
        found, _ = enc.EmbeddingCache(enc.default_cache_dir(), enc.TEXT_MODEL).get(keys)
        t0 = time.perf_counter()
        encoder = enc.minilm_encoder()
        load_s = time.perf_counter() - t0
        _, miss = enc.encode_texts(texts, cache_dir=tmp / "cache", encoder=encoder, progress=False)
        _, hit = enc.encode_texts(texts, cache_dir=tmp / "cache", encoder=encoder, progress=False)
        assert hit.cache_hit and miss.n_encoded > 0

        # --- student training throughput
        inter = pl.read_parquet(tmp / "features" / S.FILES["interactions"])
        seqs = pl.read_parquet(tmp / "features" / S.FILES["sequences"])
        cfg = dataclasses.replace(DistillConfig(), epochs=args.epochs, progress=False, patience=0)
        data = prepare_cold_start(inter, seqs, items, holdout_frac=cfg.holdout_frac, pseudo_cold_frac=cfg.pseudo_cold_frac, seed=0, history_len=cfg.history_len)
        content = enc.build_content(items, cache_dir=tmp / "cache", progress=False, text_encoder=encoder)
        old_threads = torch.get_num_threads()
        torch.set_num_threads(max(cfg.threads, 1))
        try:
            idt = ID2ItemTeacher(ID2ItemConfig(epochs=2), seed=0).fit(
                data.train_users, data.train_items, n_users=data.n_users, n_items=data.n_items, progress=False
            )
            sqt = Seq2ItemTeacher(Seq2ItemConfig(epochs=2), seed=0).fit(data.train_sequences, n_items=data.n_items, progress=False)
            targets = {"id2item": TeacherTarget(idt.item_embeddings_, idt.known_items_), "seq2item": TeacherTarget(sqt.item_embeddings_, sqt.known_items_)}
            x = ContentTensors.from_features(content, cfg.student)
            spec = ContentSpec.of(x, content.fields.vocab_size)
            runs = [fit_student(x, spec, data, targets, cfg, seed=r).samples_per_s for r in range(args.repeats)]
        finally:
            torch.set_num_threads(old_threads)

    row = {
        "source": args.source,
        "items": len(texts),
        "encode_miss_items_per_s": miss.n / max(miss.seconds, 1e-9),
        "encode_hit_items_per_s": hit.n / max(hit.seconds, 1e-9),
        "model_load_s": load_s,
        "default_cache_hit": bool(found.all()),
        "train_examples": len(data.train),
        "student_samples_per_s": statistics.median(runs),
    }
    print_table([row], list(row))
    payload = {
        "machine": machine_info(),
        "quick": args.quick,
        **row,
        "student_runs_samples_per_s": runs,
        "epochs": args.epochs,
        "batch_size": cfg.batch_size,
        "threads": cfg.threads,
        "encode_miss_seconds": miss.seconds,
        "encode_hit_seconds": hit.seconds,
        "n_unique_texts_encoded": miss.n_encoded,
        "items_in_catalog": int(np.int64(items.height)),
    }
    path = write_json("distill", payload, Path(args.out))
    print(f"wrote {path}")
    return 0
