"""`recsys experiment run|compare|promote` and `recsys config show`."""

from __future__ import annotations

import argparse
import sys

from recsys.cli import command, group

RUN_EPILOG = """\
examples:
  recsys experiment run experiments/ab_match_features.yaml
  recsys experiment run experiments/ab_match_features.yaml --seeds 0,1,2
  recsys experiment run experiments/debug_ab.yaml        # the whole chain in well under a minute

Runs features -> teachers -> distill -> match features (each once, reused
when nothing changed) and then every arm for every seed, each a run tagged
`experiment` and `arm` in MLflow; prints the comparison table at the end.
"""

COMPARE_EPILOG = """\
examples:
  recsys experiment compare ab_match_features
  recsys experiment compare ab_match_features --format markdown
  recsys experiment compare ab_match_features --format json > compare.json
  recsys experiment compare ab_match_features --fail-on-regression gauc   # exit 1 on a significant drop

Reads the newest finished run of the experiment from the tracking store, loads
each arm's saved predictions, and reports every metric per arm with its delta
vs control and a 95% interval from a bootstrap that resamples users and, with
several seeds, the seeds too (each seed reruns the arm's whole chain, so the
interval holds the training randomness of treatment and control). 'sig.'
marks an interval that excludes zero; 'Holm' is the mark after Holm's
correction across the experiment's treatment arms x metrics. A second table
gives each treatment's delta per segment of the test rows: cold vs warm items,
new vs returning users, history-length buckets. Logs the tables and plots
(arm_deltas.png, segments_<metric>.png) to MLflow. JSON rows carry arm,
metric, value, delta, ci_low, ci_high, segment ("all" for the whole test
set), p_value and sig_holm.
"""


def _run(args: argparse.Namespace) -> int:
    from recsys.cli import seed_everything
    from recsys.compare import format_rows
    from recsys.experiment import parse_seeds
    from recsys.experiment_run import run_experiment

    seeds = parse_seeds(args.seeds) if args.seeds is not None else None
    seed_everything(seeds[0] if seeds else 0, announce=False)  # the arms run under the experiment's seeds
    outcome = run_experiment(args.file, seeds=seeds, progress=not args.quiet)
    print()
    print(f"experiment {outcome.name}: {len(outcome.arm_outputs)} arm runs in {outcome.seconds:.0f}s")
    print(format_rows(outcome.rows, "table", control=outcome.control))
    print(f"\noutputs: {', '.join(sorted({str(p.parent) for p in outcome.arm_outputs.values()}))}")
    if not outcome.tracked:  # its compare would read another, tracked run (a probe, 2026-12-01)
        print("tracking is off (tracking.enabled: false): nothing was logged, so `recsys experiment compare` "
              "cannot read this run; the table above is its comparison")
    else:
        print(f"compare again: recsys experiment compare {outcome.name}{outcome.store_flag}    "
              f"open the UI: recsys ui{outcome.store_flag}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from recsys.compare import ALL, format_rows, regressions
    from recsys.config import load_pipeline_config
    from features.core.errors import UsageError
    from recsys.eval.metrics import METRICS
    from recsys.experiment import check_experiment_name, check_n_boot
    from recsys.experiment_run import compare_experiment

    check_experiment_name(args.name, "experiment compare")
    if args.fail_on_regression and args.fail_on_regression not in METRICS:
        raise UsageError(f"--fail-on-regression: unknown metric {args.fail_on_regression!r}; known: {', '.join(METRICS)}")
    if args.n_boot is not None:
        check_n_boot(args.n_boot)
    tracking = load_pipeline_config(args.config).tracking
    rows, control = compare_experiment(tracking, args.name, control=args.control, n_boot=args.n_boot)
    gate = rows
    if args.fail_on_regression:  # a gate on a metric the runs never computed would pass without looking
        def measured(rs):
            return sorted({r.metric for r in rs if r.arm != control and r.segment == ALL})

        if args.fail_on_regression not in measured(rows):  # not among the experiment's metrics: computed for the gate
            gate, _ = compare_experiment(tracking, args.name, control=args.control, n_boot=args.n_boot,
                                         metrics=(args.fail_on_regression,), log_to_store=False)
        if args.fail_on_regression not in measured(gate):
            raise UsageError(f"--fail-on-regression {args.fail_on_regression}: experiment {args.name!r} has no "
                             f"treatment-vs-control delta on it (its metrics: {', '.join(measured(rows)) or 'none'})")
    print(format_rows(rows, args.format, control=control))
    if args.fail_on_regression:
        bad = regressions(gate, args.fail_on_regression, control)
        if bad:
            arms = ", ".join(f"{r.arm} ({r.delta:+.4f} [{r.ci_low:+.4f}, {r.ci_high:+.4f}])" for r in bad)
            print(f"regression on {args.fail_on_regression}: {arms}", file=sys.stderr)
            return 1
    return 0


PROMOTE_EPILOG = """\
examples:
  recsys experiment promote ab_match_features --arm match             # guarded by gauc
  recsys experiment promote ab_match_features --arm match_svd --guard auc
  recsys experiment promote debug_ab --arm control --no-guard

Sets the registry alias `champion` on the arm's models: recsys-ranker (the
arm's ranker of the experiment's first seed, alias <experiment>-<arm>) and
recsys-student (the student the arm's chain read, if any; an arm that reads
no student leaves recsys-student@champion where it was). Exit 1, and no
alias moves, when `recsys experiment compare` marks a significant regression
of the arm vs control on the guarded metric over the whole test set; exit 2
for an unknown experiment, arm or metric, or an arm without a registered
ranker (LightGBM arms). Until a promotion, each experiment run sets
`champion` on its control arm. Serve it:
  mlflow.pyfunc.load_model("models:/recsys-ranker@champion")
"""


def _promote(args: argparse.Namespace) -> int:
    from recsys.config import load_pipeline_config
    from recsys.promote import promote_arm

    tracking = load_pipeline_config(args.config).tracking
    done = promote_arm(tracking, args.name, args.arm, guard=None if args.no_guard else args.guard)
    if done.guard_row is not None:
        r = done.guard_row
        print(f"{args.guard}: {r.arm} {r.delta:+.4f} [{r.ci_low:+.4f}, {r.ci_high:+.4f}] vs {done.control}")
    for name, version in sorted(done.versions.items()):
        print(f"{name}@champion -> version {version}  (models:/{name}@champion)")
    return 0


def _show(args: argparse.Namespace) -> int:
    import json

    from recsys.config import annotated_pipeline_yaml, load_pipeline_config

    cfg = load_pipeline_config(args.config)
    print(json.dumps(cfg.to_dict(), indent=2) if args.json else annotated_pipeline_yaml(cfg), end="")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    _, esub = group(sub, "experiment", "A/B experiments: run arms, compare them with intervals")
    p = command(
        esub,
        "run",
        help="run every arm (and seed) of an experiment file, then compare",
        description="Run an A/B experiment: a frozen baseline config plus arms given as deltas.",
        epilog=RUN_EPILOG,
    )
    p.add_argument("file", help="experiment YAML (experiments/*.yaml)")
    p.add_argument("--seeds", help="comma-separated seeds, overriding the file's `seeds`")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(handler=_run)

    c = command(
        esub,
        "compare",
        help="metric table per arm: delta vs control, paired bootstrap 95%% interval",
        description="Compare the arms of the newest run of an experiment from their saved predictions.",
        epilog=COMPARE_EPILOG,
    )
    c.add_argument("name", help="experiment name (the `experiment:` key of its file)")
    c.add_argument("--format", choices=["table", "markdown", "csv", "json"], default="table")
    c.add_argument("--fail-on-regression", metavar="METRIC", help="exit 1 when a treatment's interval lies entirely on the worse side of zero")
    c.add_argument("--control", help="control arm (default: the experiment's)")
    c.add_argument("--n-boot", type=int, help="bootstrap replicates (default: the experiment's)")
    c.add_argument("--config", help="pipeline YAML whose `tracking:` section names the store (default: MLFLOW_TRACKING_URI or ./mlflow)")
    c.set_defaults(handler=_compare)

    pr = command(
        esub,
        "promote",
        help="set the registry alias `champion` on an arm's models, unless it regresses on the guard metric",
        description="Promote an arm of an experiment: alias `champion` on its recsys-ranker and recsys-student.",
        epilog=PROMOTE_EPILOG,
    )
    pr.add_argument("name", help="experiment name (the `experiment:` key of its file)")
    pr.add_argument("--arm", required=True, help="the arm to promote")
    guard = pr.add_mutually_exclusive_group()  # `--guard auc --no-guard` promoted a regressing arm before 2026-11-30
    guard.add_argument("--guard", default="gauc", metavar="METRIC",
                       help="refuse (exit 1) when the arm significantly regresses on it (default gauc)")
    guard.add_argument("--no-guard", action="store_true", help="promote without checking any metric")
    pr.add_argument("--config", help="pipeline YAML whose `tracking:` section names the store (default: MLFLOW_TRACKING_URI or ./mlflow)")
    pr.set_defaults(handler=_promote)

    _, csub = group(sub, "config", "pipeline configs: show the resolved config")
    s = command(
        csub,
        "show",
        help="print the resolved pipeline config, every key annotated with type and meaning",
        description="Print a pipeline config with all defaults filled in (annotated YAML, or JSON).",
        epilog="examples:\n  recsys config show\n  recsys config show --config experiments/configs/debug.yaml --json",
    )
    s.add_argument("--config", help="pipeline YAML/JSON (default: built-in defaults)")
    s.add_argument("--json", action="store_true", help="JSON instead of annotated YAML")
    s.set_defaults(handler=_show)
