"""`recsys baseline lightgbm`: the LightGBM baseline ranker (train/valid/test report)."""

from __future__ import annotations

import argparse
import dataclasses

from recsys.cli import group

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
OUT/manifest.json; with --lift, OUT/with_match/, OUT/no_match/ and
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
    from recsys.config import load_pipeline_config
    from recsys.baseline import check_inputs, match_lift, run_lightgbm
    from recsys.tracking import open_pipeline_run

    pcfg = load_pipeline_config(args.config)
    cfg = pcfg.lightgbm
    match_dir = None if args.no_match else args.match_features
    if args.no_match:
        cfg = dataclasses.replace(cfg, use_match_features=False)
    if args.n_boot < 2:
        raise UsageError(f"--n-boot must be >= 2 (a bootstrap interval needs replicates), got {args.n_boot}")
    if args.lift and match_dir is None:
        raise UsageError("--lift compares with and without match features: give --match-features (and no --no-match)")
    if cfg.use_match_features and match_dir is None and not args.lift:
        raise UsageError("lightgbm.use_match_features is true but no --match-features was given: "
                         "pass --match-features DIR, or --no-match to train without them")
    if not cfg.use_match_features and match_dir is not None and not args.lift:
        raise UsageError(f"--match-features {match_dir} was given but lightgbm.use_match_features is false in "
                         f"{args.config}: drop one of them")
    check_inputs(args.features, match_dir)
    check_output(args.out, {"--features": args.features, "--match-features": match_dir, "--config": args.config})
    params = {"lightgbm": dataclasses.asdict(cfg), "features": args.features, "match_features": match_dir or "none"}
    with open_pipeline_run(pcfg.tracking, "baseline-lightgbm", tags={"model": "lightgbm"}, params=params) as run:
        with run.stage("lightgbm", params=params, reuse=False) as stage:
            if args.lift:
                match_lift(args.features, match_dir, args.out, cfg, stage, n_boot=args.n_boot)
            else:
                run_lightgbm(args.features, match_dir, args.out, cfg, stage)
            stage.set_outputs(args.out)
    print(f"output: {args.out}")
    return 0


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `baseline` group with `lightgbm`; returns the lightgbm parser."""
    _, bsub = group(sub, "baseline", "baseline rankers (LightGBM on tabular and match features)")
    p = bsub.add_parser(
        "lightgbm",
        help="LightGBM on popularity/activity/history/rate features (+ match features): test AUC, GAUC, LT AUC",
        description="Train the LightGBM baseline on train, early-stop on valid, report on test.",
        epilog=LIGHTGBM_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--features", required=True, metavar="DIR", help="a folder written by `recsys features build`")
    p.add_argument("--match-features", metavar="DIR", help="a folder written by `recsys features match`")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--config", metavar="FILE", help="pipeline YAML/JSON (sections `lightgbm`, `tracking`)")
    p.add_argument("--no-match", action="store_true", help="leave the match features out")
    p.add_argument("--lift", action="store_true", help="run with and without match features and compare test GAUC")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap replicates for --lift (default 1000)")
    p.set_defaults(handler=_lightgbm)
    return p
