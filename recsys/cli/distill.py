"""`recsys teachers fit`, `recsys distill train`, `recsys distill eval`."""

from __future__ import annotations

import argparse

from recsys.cli import command, group

COMMON_EPILOG = """\
--config FILE is a pipeline YAML: its `teachers:` and `distill:` sections and
its top-level `seed:` are used (missing sections take their defaults). --out
may not be, contain or lie inside --features or --config (exit 2). The
text encoder caches its vectors under $RECSYS_CACHE_DIR/encoders (default
~/.cache/recsys-plugin/encoders), so only the first run encodes (~30 s on
ML-100K). A rerun with the same config and features reuses what is up to
date; --force recomputes.
"""

TEACHERS_EPILOG = """\
examples:
  recsys teachers fit --features artifacts/ml100k/features --out artifacts/ml100k/distill/teachers
  recsys teachers fit --features DIR --out DIR2 --config experiments/configs/base.yaml

Writes id2item.parquet and seq2item.parquet (item_id, embedding, known),
teachers.pt and manifest.json. `distill train --out X` looks for its teachers
in X/teachers.

""" + COMMON_EPILOG

TRAIN_EPILOG = """\
examples:
  recsys distill train --features artifacts/ml100k/features --out artifacts/ml100k/distill
  recsys distill train --features DIR --out DIR2 --config experiments/configs/debug.yaml

Writes DIR2/teachers/, DIR2/student/ and DIR2/item_embeddings.parquet: the
student's embedding of every item (item_id, embedding), cold items included.

""" + COMMON_EPILOG

EVAL_EPILOG = """\
examples:
  recsys distill eval --features artifacts/ml100k/features --out artifacts/ml100k/distill
  recsys distill eval --features DIR --out DIR2 --no-ablations

Holds out 20% of the items with train events (distill.holdout_frac) from all
training, then compares on test positives, warm vs cold targets:
raw content, popularity, ID teacher, sequence teacher, the student and one
ablation per loss (s2i, id2i, i2i). Writes DIR2/metrics.json (Recall@10/50/100
per model and group, NMI / Kendall tau / top-k overlap / bijective accuracy vs
the teachers) and DIR2/item_embeddings.parquet. A metric that cannot be
computed (no cold target in test, a teacher that knows too few items) is null
in metrics.json, with why under its "reasons", and n/a in the table.

""" + COMMON_EPILOG


def _configs(args: argparse.Namespace):
    """The pipeline config from --config (defaults without it), seeding once.
    --out is checked first: it may not overlap --features or --config."""
    from features.core.paths import check_output
    from recsys.cli import seed_everything
    from recsys.config import load_pipeline_config

    check_output(args.out, {"--features": args.features, "--config": args.config})
    pipe = load_pipeline_config(args.config)
    seed_everything(pipe.seed)
    return pipe


def _params(pipe, args: argparse.Namespace) -> dict:
    return {"teachers": pipe.teachers, "distill": pipe.distill, "seed": pipe.seed, "features": args.features}


def _fit_teachers(args: argparse.Namespace) -> int:
    from distill.jobs import fit_teachers
    from recsys.tracking import tracked_command

    pipe = _configs(args)
    with tracked_command(pipe.tracking, "teachers", _params(pipe, args), outputs=args.out) as st:
        res = fit_teachers(args.features, args.out, pipe.teachers, st, distill=pipe.distill, seed=pipe.seed, force=args.force)
    print(f"output: {res.out_dir}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from distill.jobs import train_student
    from recsys.tracking import tracked_command

    pipe = _configs(args)
    with tracked_command(pipe.tracking, "distill", _params(pipe, args), outputs=args.out) as st:
        res = train_student(args.features, args.out, pipe.distill, st, teachers=pipe.teachers, seed=pipe.seed, force=args.force)
        st.log_artifact(res.out_dir / "item_embeddings.parquet")
    print(f"output: {res.out_dir / 'item_embeddings.parquet'}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from distill.jobs import evaluate, format_metrics
    from recsys.tracking import tracked_command

    pipe = _configs(args)
    with tracked_command(pipe.tracking, "distill", _params(pipe, args) | {"ablations": pipe.distill.ablations and not args.no_ablations}, outputs=args.out) as st:
        res = evaluate(
            args.features, args.out, pipe.distill, st,
            teachers=pipe.teachers, seed=pipe.seed, ablations=pipe.distill.ablations and not args.no_ablations, force=args.force,
        )  # fmt: skip
        st.log_artifact(res.out_dir / "metrics.json")
        st.log_artifact(res.out_dir / "item_embeddings.parquet")
    if not args.quiet:
        print(format_metrics(res.metrics or {}, tuple(pipe.distill.eval_ks)))
    print(f"output: {res.out_dir / 'metrics.json'}")
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--features", required=True, help="a folder written by `recsys features build`")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--config", help="pipeline YAML/JSON (sections `teachers`, `distill`, and `seed`)")
    p.add_argument("--force", action="store_true", help="recompute even when the outputs are up to date")


def register(sub: argparse._SubParsersAction) -> None:
    _, tsub = group(sub, "teachers", "collaborative teachers: ID-to-item and sequence-to-item")
    t = command(
        tsub, "fit",
        help="fit the ID and sequence teachers (train split minus held-out items)",
        description="Fit the ID-to-item (TorchRec MF) and sequence-to-item teachers whose item tables the student distills.",
        epilog=TEACHERS_EPILOG, handler=_fit_teachers,
    )  # fmt: skip
    _common(t)

    _, dsub = group(sub, "distill", "content-only student distilled from the teachers: train, evaluate")
    tr = command(
        dsub, "train",
        help="train the student and write item_embeddings.parquet for every item",
        description="Fit (or reuse) the teachers, then train the content-only student with L_s2i + L_id2i + L_i2i.",
        epilog=TRAIN_EPILOG, handler=_train,
    )  # fmt: skip
    _common(tr)
    ev = command(
        dsub, "eval",
        help="cold-start evaluation: student vs content, teachers, ablations",
        description="Teachers, student, ablations, baselines and diagnostics on held-out (cold) and warm items.",
        epilog=EVAL_EPILOG, handler=_eval,
    )  # fmt: skip
    _common(ev)
    ev.add_argument("--no-ablations", action="store_true", help="skip the three one-loss-off students")
    ev.add_argument("--quiet", action="store_true", help="print only the output path")
