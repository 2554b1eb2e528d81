"""`recsys rank train`: train the TorchRec ranker, write metrics.json + predictions.parquet.

Distributed (same code, DistributedModelParallel over gloo on CPU):
    torchrun --nproc_per_node=2 -m recsys.cli.rank train --config FILE --out DIR
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from recsys.cli import command, dispatch, group

TRAIN_EPILOG = """\
examples:
  recsys rank train --config experiments/configs/debug.yaml --out artifacts/rank/debug
  torchrun --nproc_per_node=2 -m recsys.cli.rank train --config FILE --out DIR

Config sections used: paths (features, match_features, embeddings), data
(history_cap, use_match_features, match_columns, negatives_per_request),
ranker, train, seed. Writes DIR/metrics.json (test auc, gauc,
logloss, lt_auc, lt_spearman, valid metrics, per-activity AUC) and
DIR/predictions.parquet (one row per test impression) and DIR/manifest.json.
A rerun with the same config, inputs and code is skipped; an interrupted run
resumes from DIR/checkpoints/last.pt (--no-resume starts over). Under torchrun
the checkpoints are per rank, so no recsys-ranker is registered in MLflow
(a single-process run registers it; the world size is part of the reuse key).
A metric that cannot be computed (e.g. no observed LT rows) is null in
metrics.json with its reason under "reasons", and printed as n/a.

Exit status: 0 ok; 1 bad data, a corrupt checkpoint (use --no-resume) or a
diverged run (NaN/inf loss, gradient or score: the epoch and step are named);
2 a config or usage error: an unknown key, a non-finite number, a requested
match-features or embeddings path that does not exist, an --out that overlaps
an input, WORLD_SIZE set without torchrun.
"""


def _train(args: argparse.Namespace) -> int:
    import os

    from features.core.paths import check_output
    from recsys.cli import seed_everything
    from recsys.config import load_pipeline_config
    from recsys.plan import check_inputs, plan_rank
    from recsys.stages import rank_upstream, run_rank
    from recsys.tracking import tracked_command
    from recsys.train import check_launch_env, metrics_line

    overrides = {"train": {"resume": False}} if args.no_resume else None
    cfg = load_pipeline_config(args.config, overrides)
    check_launch_env()
    job = plan_rank(cfg)
    inputs = {**check_inputs(job), "--config": args.config}
    check_output(args.out, inputs)
    if job.train.checkpoint_dir:
        check_output(job.train.checkpoint_dir, inputs, flag="train.checkpoint_dir")
    seed_everything(job.seed)
    rank0 = int(os.environ.get("RANK", "0")) == 0
    with tracked_command(cfg.tracking, "rank", job, tags={"model": "ranker"}, enabled=rank0, outputs=args.out,
                         upstream=rank_upstream(job)) as st:
        result = run_rank(job, st, args.out, force=args.no_resume or not cfg.tracking.reuse,
                          log=lambda m: print(m, file=sys.stderr))
        if rank0 and result.key:
            st.record_key(result.key, reused=result.reused)
    if rank0:
        import json

        from features import schemas as S

        metrics = json.loads((result.out / S.METRICS_FILE).read_text())
        print(f"test {metrics_line(metrics, ('auc', 'gauc', 'logloss', 'lt_auc', 'lt_spearman'))}", file=sys.stderr)
        print(f"output: {args.out}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    _, rsub = group(sub, "rank", "ranker: train and evaluate the TorchRec ranker")
    p = command(
        rsub,
        "train",
        help="train the ranker (history encoder, match features, click + LT heads)",
        description="Train the TorchRec ranker on a features folder; evaluate on the test split.",
        epilog=TRAIN_EPILOG,
    )
    p.add_argument("--config", required=True, help="pipeline YAML/JSON (sections paths, data, ranker, train, seed)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--no-resume", action="store_true", help="retrain from scratch: ignore checkpoints and an up-to-date OUT")
    p.set_defaults(handler=_train)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m recsys.cli.rank train ...` (what torchrun launches): the
    `rank` group alone, with the exit statuses of `recsys` (0 ok, 1 data, 2 usage)."""
    from recsys.cli import add_debug_flag, pop_debug

    parser = argparse.ArgumentParser(prog="python -m recsys.cli.rank")
    add_debug_flag(parser)
    register(parser.add_subparsers(dest="command"))
    rest, debug = pop_debug(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(["rank", *rest])
    args.debug = args.debug or debug
    return dispatch(parser, args)


if __name__ == "__main__":
    raise SystemExit(main())
