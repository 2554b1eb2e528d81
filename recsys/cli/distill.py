"""`recsys teachers fit`, `recsys distill train`, `recsys distill eval`."""

from __future__ import annotations

import argparse
import json

from recsys.cli import command, group, warnings_only

COMMON_EPILOG = """\
--config FILE is a pipeline YAML: its `teachers:` and `distill:` sections and
its top-level `seed:` are used (missing sections take their defaults). --out
may not be, contain or lie inside --features or --config (exit 2). The
text encoder caches its vectors under $RECSYS_CACHE_DIR/encoders (default
~/.cache/recsys-plugin/encoders), so only the first run encodes (half a minute on
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
  recsys distill eval --features DIR --out DIR2 --no-ablations --seed 1
  recsys distill eval --features DIR --out DIR2 --no-ablations --seeds 0,1,2

Holds out 20% of the items with train events (distill.holdout_frac, the
test-cold items) and another 10% (distill.pseudo_cold_frac, the valid-cold
items that drive early stopping) from all training, then compares on test
positives, warm vs cold targets: raw content, popularity, ID teacher,
sequence teacher, the student, the content-only two-tower baseline and one
ablation per loss (s2i, id2i, i2i). --seed S: deterministic per seed. Writes DIR2/metrics.json (Recall@10/50/100
per model and group, NMI / Kendall tau / top-k overlap / bijective accuracy vs
the teachers) and DIR2/item_embeddings.parquet. A metric that cannot be
computed (no cold target in test, a teacher that knows too few items) is null
in metrics.json, with why under its "reasons", and n/a in the table.

""" + COMMON_EPILOG


def _plan(args: argparse.Namespace):
    """The pipeline config from --config (defaults without it) and the distill
    job planned from it (`recsys.plan.plan_distill`: --seed, else each
    section's seed, else the top-level one), seeding once. --out is checked
    first: it may not overlap --features or --config."""
    from features.core.paths import check_output
    from recsys.cli import seed_everything
    from recsys.config import load_pipeline_config
    from recsys.plan import plan_distill

    check_output(args.out, {"--features": args.features, "--config": args.config})
    if getattr(args, "seed", None) is not None:
        from recsys.experiment import check_seeds

        check_seeds((args.seed,), "--seed")  # the range --seeds and config seeds are held to
    cfg = load_pipeline_config(args.config)
    ablations = cfg.distill.ablations and not getattr(args, "no_ablations", False)
    job = plan_distill(cfg, features=args.features, seed=getattr(args, "seed", None), ablations=ablations)
    seed_everything(job.distill.seed)
    return cfg, job


def _params(job, args: argparse.Namespace) -> dict:
    return {"teachers": job.teachers, "distill": job.distill, "seed": job.distill.seed, "features": args.features}


def _upstream(job) -> dict[str, str]:
    """The command's input fingerprint (its runs' data_fingerprint)."""
    from features.core.manifest import folder_fingerprint

    return {"features": folder_fingerprint(job.features)}


def _fit_teachers(args: argparse.Namespace) -> int:
    from distill.jobs import fit_teachers
    from recsys.tracking import tracked_command

    cfg, job = _plan(args)
    with tracked_command(cfg.tracking, "teachers", _params(job, args), outputs=args.out, upstream=_upstream(job)) as st:
        res = fit_teachers(job.features, args.out, job.teachers, st, distill=job.distill, seed=job.distill.seed,
                           force=args.force or not cfg.tracking.reuse)
        st.record_key(res.manifest.get("key", {}), reused=res.skipped)
    print(f"output: {res.out_dir}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from distill.jobs import train_student
    from recsys.tracking import tracked_command

    cfg, job = _plan(args)
    with tracked_command(cfg.tracking, "distill", _params(job, args), outputs=args.out, upstream=_upstream(job)) as st:
        res = train_student(job.features, args.out, job.distill, st, teachers=job.teachers, seed=job.distill.seed,
                            force=args.force or not cfg.tracking.reuse)
        st.record_key(res.manifest.get("key", {}), reused=res.skipped)
        st.log_artifact(res.out_dir / "item_embeddings.parquet")
    print(f"output: {res.out_dir / 'item_embeddings.parquet'}")
    return 0


def _seed_list(text: str) -> list[int]:
    """`--seeds` as `experiment run` reads it (`recsys.experiment.parse_seeds`)."""
    from features.core.errors import ConfigError
    from recsys.experiment import parse_seeds

    try:
        return list(parse_seeds(text))
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _eval(args: argparse.Namespace) -> int:
    from distill.jobs import evaluate_seeds, format_metrics, format_seeds
    from distill.jobs.artifacts import log_default
    from recsys.stages import run_distill
    from recsys.tracking import tracked_command

    cfg, job = _plan(args)
    if args.seeds:
        with tracked_command(cfg.tracking, "distill", _params(job, args) | {"ablations": job.ablations, "seeds": args.seeds},
                             outputs=args.out) as st:
            report = evaluate_seeds(
                job.features, args.out, job.distill, st, teachers=job.teachers, seeds=args.seeds,
                ablations=job.ablations, force=args.force or not cfg.tracking.reuse,
            )
        if not args.quiet:
            print(format_seeds(report))
        print(f"output: {args.out}/seeds.json")
        return 0
    with tracked_command(cfg.tracking, "distill", _params(job, args) | {"ablations": job.ablations}, outputs=args.out,
                         upstream=_upstream(job)) as st:
        # its progress and warnings (empty texts, a valid split with nothing to select on) reach the user;
        # the metrics table is printed below (not with --quiet)
        res = run_distill(job, st, args.out, force=args.force or not cfg.tracking.reuse,
                          log=warnings_only if args.quiet else log_default,
                          show_metrics=False)
        st.record_key(res.key, reused=res.reused)
        st.log_artifact(res.out / "metrics.json")
    metrics = json.loads((res.out / "metrics.json").read_text())
    if not args.quiet:
        print(format_metrics(metrics, tuple(job.distill.eval_ks)))
    print(f"output: {res.out / 'metrics.json'}")
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
    seeds = ev.add_mutually_exclusive_group()
    seeds.add_argument("--seed", type=int, help="seed of every random choice (held-out items, teachers, student); default: the config's `seed`")
    seeds.add_argument(
        "--seeds", type=_seed_list,
        help="comma-separated seeds, e.g. 0,1,2: one evaluation per seed into OUT/seed_S, then OUT/seeds.json "
        "(mean, spread, paired bootstrap CI over users and seeds of the student/content cold R@50 ratio)",
    )  # fmt: skip
    ev.add_argument("--quiet", action="store_true", help="print only the output path")
