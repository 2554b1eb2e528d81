"""Distillation jobs: the only package of `distill` that reads and writes files
(besides the encoders' embedding cache, see distill/encoders/cache.py).

    fit_teachers(features_dir, out_dir, cfg, tracker)   teachers into out_dir
    train_student(features_dir, out_dir, cfg, tracker)  teachers, student, published embeddings
    evaluate(features_dir, out_dir, cfg, tracker)       all of the above + ablations + two-tower + metrics.json
    evaluate_seeds(features_dir, out_dir, cfg, seeds=)  evaluate per seed into out_dir/seed_{s} + seeds.json

Output folder of `train_student` / `evaluate`:

    OUT/teachers/                 id2item.parquet, seq2item.parquet (item_id, embedding, known),
                                  teachers.pt, manifest.json   (= what `fit_teachers` writes)
    OUT/student/                  item_embeddings.parquet, student.pt, manifest.json
    OUT/ablations/no_{loss}/      the same for each ablation (evaluate only)
    OUT/baselines/two_tower/      the content-only two-tower baseline (evaluate, distill.two_tower)
    OUT/test_hits.parquet         evaluate only: per test impression, hit@50 of student, content, two-tower
    OUT/item_embeddings.parquet   the student's embedding of EVERY item (item_id Int64,
                                  embedding List(Float32), L2-normalised)
    OUT/metrics.json              evaluate only: {name: number or null}, plus "reasons": {name: why it is null}
    OUT/manifest.json             job distill.train or distill.eval

Every folder's manifest key holds the job, its version, the config hash, the
protocol (holdout share and seed, query length...), the fingerprints of the
features manifest's outputs and of the stage's own inputs (the teachers'
tables for a student). A rerun whose key matches reuses the folder; `force`
recomputes. Outputs are written with `features.core.manifest.atomic_outputs`, so a
killed job never leaves a half-written file under its final name.

Modules: inputs.py (the features folder, read and checked once),
artifacts.py (names, tables, checkpoints, the published folder),
teachers.py, student.py and evaluation.py (one job each), report.py (the
metrics table).
"""

from __future__ import annotations

from distill.jobs.artifacts import JobResult
from distill.jobs.evaluation import evaluate
from distill.jobs.report import format_metrics, format_seeds
from distill.jobs.seeds import evaluate_seeds
from distill.jobs.student import train_student
from distill.jobs.teachers import fit_teachers

__all__ = ["JobResult", "fit_teachers", "train_student", "evaluate", "evaluate_seeds", "format_metrics", "format_seeds"]
