"""`recsys baseline lightgbm`: the LightGBM baseline ranker (train/valid/test report)."""

from __future__ import annotations

import argparse

from recsys.cli import command, group

LIGHTGBM_EPILOG = """\
examples:
  recsys baseline lightgbm --features artifacts/ml100k/features \\
      --match-features artifacts/ml100k/match --out artifacts/ml100k/lightgbm
  recsys baseline lightgbm --features F --out out/lgb_nomatch --no-match
  # both arms and the test-GAUC lift of the match features (paired bootstrap over users)
  recsys baseline lightgbm --features F --match-features M --out out/lgb --lift
  recsys baseline lightgbm --features F --match-features M --out out/lgb --config experiments/configs/base.yaml

Trains a click model (label) and an LT-proxy model (returned_1d, observed rows)
on the train split, early-stops on valid, scores test. Writes OUT/metrics.json
(auc, gauc, logloss, lt_auc, lt_spearman on test, valid_* on valid),
OUT/predictions.parquet (user_id, item_id, timestamp, label, score, lt_score,
returned_1d, active_days_7, lt_observed), OUT/feature_importance.png and
OUT/manifest.json (a rerun with the same config, inputs and code is skipped);
with --lift, OUT/with_match/, OUT/no_match/ and
OUT/lift.json. Settings: the `lightgbm:` section of --config; runs are tracked
per its `tracking:` section (tracking.enabled: false logs nothing).

lightgbm.use_match_features (default true) needs --match-features DIR holding
match_features.parquet; --no-match trains without them. A metric that cannot
be computed (single-class test labels, no observed LT rows) is null in
metrics.json with its reason under "reasons"; train labels of one class only
are an error (exit 1): there is nothing to learn.
"""


def _lightgbm(args: argparse.Namespace) -> int:
    from features.core.errors import UsageError
    from features.core.paths import check_output
    from recsys.baseline import match_lift
    from recsys.config import load_pipeline_config
    from recsys.plan import check_inputs, plan_lightgbm
    from recsys.stages import run_lightgbm
    from recsys.tracking import open_pipeline_run

    from recsys.experiment import check_n_boot

    check_n_boot(args.n_boot)  # as `experiment compare`: a handful of replicates marks noise significant
    if args.lift and (args.match_features is None or args.no_match):
        raise UsageError("--lift compares with and without match features: give --match-features (and no --no-match)")
    overrides: dict = {"paths": {"features": args.features}}
    if args.match_features is not None and not args.no_match:
        overrides["paths"]["match_features"] = args.match_features
    if args.no_match:
        overrides["lightgbm"] = {"use_match_features": False}
    cfg = load_pipeline_config(args.config, overrides)
    if not args.lift:
        if cfg.lightgbm.use_match_features and args.match_features is None:
            raise UsageError("lightgbm.use_match_features is true but no --match-features was given: "
                             "pass --match-features DIR, or --no-match to train without them")
        if not cfg.lightgbm.use_match_features and args.match_features is not None and not args.no_match:
            raise UsageError(f"--match-features {args.match_features} was given but lightgbm.use_match_features is "
                             f"false in {args.config}: drop one of them")
    job = plan_lightgbm(cfg) if not args.lift else plan_lightgbm(
        load_pipeline_config(args.config, {**overrides, "lightgbm": {"use_match_features": True}}))
    inputs = check_inputs(job)
    check_output(args.out, {"--features": inputs["paths.features"], "--match-features": inputs["paths.match_features"],
                            "--config": args.config})
    with open_pipeline_run(cfg.tracking, "baseline-lightgbm", tags={"model": "lightgbm"}, params=job) as run:
        with run.stage("lightgbm", params=job, outputs=args.out) as stage:
            if args.lift:
                match_lift(job.features, job.match, args.out, job.config, stage, n_boot=args.n_boot)
            else:
                result = run_lightgbm(job, stage, args.out, force=not cfg.tracking.reuse)
                run.record_key(stage, result.key, reused=result.reused)
    print(f"output: {args.out}")
    return 0


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `baseline` group with `lightgbm`; returns the lightgbm parser."""
    _, bsub = group(sub, "baseline", "baseline rankers (LightGBM on tabular and match features)")
    p = command(
        bsub,
        "lightgbm",
        help="LightGBM on popularity/activity/history/rate features (+ match features): test AUC, GAUC, LT AUC",
        description="Train the LightGBM baseline on train, early-stop on valid, report on test.",
        epilog=LIGHTGBM_EPILOG,
        handler=_lightgbm,
    )
    p.add_argument("--features", required=True, metavar="DIR", help="a folder written by `recsys features build`")
    p.add_argument("--match-features", metavar="DIR", help="a folder written by `recsys features match`")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--config", metavar="FILE", help="pipeline YAML/JSON (sections `lightgbm`, `tracking`)")
    p.add_argument("--no-match", action="store_true", help="leave the match features out")
    p.add_argument("--lift", action="store_true", help="run with and without match features and compare test GAUC")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap replicates for --lift (default 1000)")
    return p
