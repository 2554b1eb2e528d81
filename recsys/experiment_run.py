"""Run an A/B experiment, and compare its arms again later.

    run_experiment(path)        every arm and seed (`recsys.pipeline.Pipeline.arm`), then compare
    compare_experiment(cfg, n)  recompute the comparison from the newest run's saved predictions

One parent run per invocation. Arm runs are tagged `experiment`, `arm` and
`seed`; the parent records which folder holds each arm's predictions
(`arm_runs.json`), with the predictions' row count and content fingerprint as
the run finished: `compare` refuses a file that no longer matches
(truncated, replaced, rewritten).
"""

from __future__ import annotations

import dataclasses
import json
import math
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from features import schemas as S
from features.core.errors import DataError, UsageError
from features.core.fingerprint import file_fingerprint
from features.core.tracker import Tracker
from recsys.compare import ALL, KEY, NEW_USER, ArmPredictions, CompareRow, compare_arms, format_rows, headless, metric_rows
from recsys.config import PipelineConfig
from recsys.eval.metrics import METRICS
from recsys.experiment import LoadedExperiment, check_n_boot, identical_arms, load_experiment
from recsys.pipeline import Pipeline
from recsys.tracking.config import TrackingConfig

Log = Callable[[str], None]
ARM_RUNS = "arm_runs.json"
COMPARE_JSON = "compare.json"
PREDICTIONS = S.PREDICTIONS_FILE
DEFAULT_METRICS = ("auc", "gauc", "logloss", "lt_auc", "lt_spearman")


@dataclass
class ExperimentOutcome:
    name: str
    control: str
    rows: list[CompareRow]
    arm_outputs: dict[str, Path]
    seconds: float
    store_flag: str = ""  # " --config BASELINE" when the baseline's tracking differs from the defaults
    tracked: bool = True  # tracking.enabled: false logs nothing, so `compare` cannot read the run


def _log_default(msg: str) -> None:
    print(msg, flush=True)


def _log_err(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def read_predictions(path: Path, arm: str, seed: int, metrics: tuple[str, ...] = DEFAULT_METRICS) -> pl.DataFrame:
    """An arm's predictions table, checked: readable parquet, the columns
    `metrics` need, no NaN score. DataError naming the file otherwise."""
    where = f"predictions of arm {arm!r} (seed {seed})"
    try:
        frame = pl.read_parquet(path)
    except FileNotFoundError:
        raise DataError(f"{where} are missing", file=str(path)) from None
    except (pl.exceptions.PolarsError, OSError) as e:
        raise DataError(f"{where} cannot be read as parquet ({type(e).__name__}: {e}); rerun the arm", file=str(path)) from None
    need = list(KEY)
    for m in metrics:
        need += [c for c in (METRICS[m].label, METRICS[m].score) if c not in need]
    missing = [c for c in need if c not in frame.columns]
    if missing:
        raise DataError(f"{where} lack column(s) {missing}", file=str(path), column=missing[0])
    for m in (METRICS[n] for n in metrics):
        # an LT column that is NaN on every row is a model without an LT head (LightGBM when valid had no observed
        # LT rows): its LT metrics are n/a with that reason; a NaN among the scores a metric reads is an error
        if frame[m.score].dtype.is_float() and not headless(frame, m):
            bad = np.flatnonzero(np.isnan(frame[m.score].to_numpy().astype(np.float64)) & metric_rows(frame, m))
            if bad.size:
                raise DataError(f"{where}: {bad.size} NaN score(s)", file=str(path), column=m.score, rows=bad.tolist())
    return frame


def check_recorded(entry: dict[str, Any], frame: pl.DataFrame, path: Path) -> None:
    """DataError when an arm's predictions differ from what its run recorded
    as it finished (row count, then content fingerprint)."""
    where = f"predictions of arm {entry['arm']!r} (seed {entry['seed']})"
    if "rows" not in entry or "fingerprint" not in entry:
        print(f"warning: {where} cannot be verified: the run recorded no row count or fingerprint "
              "(made by an older version); rerun the experiment to record them", file=sys.stderr)
        return
    if frame.height != int(entry["rows"]):
        raise DataError(
            f"{where} have {frame.height} rows, but the run recorded {entry['rows']} on the test split when it "
            "finished: the file was truncated or replaced; rerun the experiment", file=str(path),
        )
    if file_fingerprint(path) != entry["fingerprint"]:
        raise DataError(
            f"{where} changed since the run finished (fingerprint {file_fingerprint(path)} != recorded "
            f"{entry['fingerprint']}); rerun the experiment", file=str(path),
        )




def experiment_root(exp: LoadedExperiment) -> Path:
    return Path(exp.arm_configs[exp.spec.control].paths.root)


def run_experiment(
    path: str | Path,
    *,
    seeds: tuple[int, ...] | None = None,
    log: Log = _log_default,
    progress: bool = True,
) -> ExperimentOutcome:
    """Validate everything, run every arm and seed, compare, log it all."""
    from recsys.tracking import open_pipeline_run

    t0 = time.perf_counter()
    exp = load_experiment(path, seeds)
    base = PipelineConfig.from_mapping(exp.baseline, where=str(exp.baseline_path))
    tracking = base.tracking
    for arm, cfg in exp.arm_configs.items():
        if cfg.tracking != tracking:
            raise UsageError(f"{exp.path}: arm {arm!r} changes `tracking`: all arms of an experiment log to one store")
        if cfg.paths.root != base.paths.root:
            raise UsageError(f"{exp.path}: arm {arm!r} changes `paths.root`: every arm writes under the baseline's "
                             f"root ({base.paths.root}/experiments/{exp.name}); to give an arm other inputs set "
                             "paths.features or paths.embeddings")
    for arm in exp.spec.arms:
        try:
            Pipeline.check_inputs(exp.arm_configs[arm.name], arm.model)
        except UsageError as e:
            raise UsageError(f"{exp.path}: arm {arm.name!r}: {e}") from e
    for first, same in identical_arms(exp):
        log(f"warning: {exp.path}: arm {same!r} is configured exactly like arm {first!r} (its delta changes nothing "
            "the baseline does not already set): their difference is zero by construction")
    name = exp.name
    root = experiment_root(exp)
    tags = {"experiment": name, "control": exp.spec.control, "kind": "experiment"}
    params = {"experiment": name, "baseline": str(exp.baseline_path), "seeds": list(exp.spec.seeds), "arms": [a.name for a in exp.spec.arms]}
    arm_outputs: dict[str, Path] = {}  # "arm/seedN" -> output folder
    arm_runs: list[dict[str, Any]] = []  # what `compare` reads back: arm, seed, outputs
    predictions: list[ArmPredictions] = []
    fingerprints: dict[str, str] = {}
    segment_tables: dict[Path, pl.DataFrame | None] = {}  # features folder -> its test segments, read once
    with open_pipeline_run(tracking, f"experiment {name}", tags=tags, params=params, log=log) as run:
        run.log_dict({"spec": dataclasses.asdict(exp.spec), "baseline": exp.baseline}, "experiment.json")
        pipe = Pipeline(run, log, progress=progress, force=not tracking.reuse)
        for arm in exp.spec.arms:
            cfg = exp.arm_configs[arm.name]
            for seed in exp.spec.seeds:
                log(f"== arm {arm.name} ({arm.model}), seed {seed}")
                out = root / "experiments" / name / arm.name / f"seed{seed}"
                arm_tags = {"arm": arm.name, "seed": seed, "model": arm.model}
                key = f"{arm.name}/seed{seed}"
                done = pipe.arm(cfg, arm.model, seed, out, arm_tags)
                arm_outputs[key], fingerprints[key] = done.out, done.fingerprint
                f = arm_outputs[key] / PREDICTIONS
                frame = read_predictions(f, arm.name, seed, exp.spec.metrics)
                # absolute: `compare` reads them back from any working directory (paths.root may be relative)
                arm_runs.append({"arm": arm.name, "seed": seed, "outputs": str(arm_outputs[key].resolve()),
                                 "rows": frame.height, "fingerprint": file_fingerprint(f),
                                 "features": str(Path(done.features).resolve()),
                                 "features_fingerprint": segments_fingerprint(done.features)})
                predictions.append(ArmPredictions(arm.name, seed, with_segments(frame, done.features, segment_tables)))
        run.log_dict(arm_runs, ARM_RUNS)
        with run.stage("eval", {"n_boot": exp.spec.n_boot, "metrics": list(exp.spec.metrics), "control": exp.spec.control},
                       fingerprints) as st:
            rows = compare_arms(predictions, control=exp.spec.control, metrics=exp.spec.metrics, n_boot=exp.spec.n_boot)
            log_compare(rows, st, root / "experiments" / name, control=exp.spec.control, predictions=predictions)
            whole = [r for r in rows if r.segment == ALL]
            values = {f"{r.metric}.{r.arm}": r.value for r in whole} | {f"{r.metric}.{r.arm}.delta": r.delta for r in whole}
            values |= {f"{r.metric}.{r.arm}.delta.{r.segment}": r.delta for r in rows if r.segment != ALL}
            st.log_metrics({k: v for k, v in values.items() if not math.isnan(v)})  # n/a is not a number
        from recsys.tracking.models import claim_champion

        # champion moves only now, when every arm has finished (a killed run moves none)
        arms = [exp.spec.control] + [a.name for a in exp.spec.arms if a.name != exp.spec.control]
        claim_champion(run, [arm_outputs[f"{a}/seed{exp.spec.seeds[0]}"] for a in arms])
    return ExperimentOutcome(name, exp.spec.control, rows, arm_outputs, time.perf_counter() - t0,
                             store_flag(tracking, exp.baseline_path), tracking.enabled)


def store_flag(tracking: TrackingConfig, baseline: Path) -> str:
    """" --config BASELINE" when the baseline's tracking section names another
    store, MLflow experiment or artifact root than the defaults (without it,
    `compare` would read another store, or an older run: a probe, 2026-12-01)."""
    default = TrackingConfig(enabled=tracking.enabled, reuse=tracking.reuse)
    return f" --config {shlex.quote(str(baseline))}" if tracking != default else ""


def segments_fingerprint(features: Path | None) -> str | None:
    """The fingerprint of the features folder's interactions (its manifest's),
    which the segments are read from; None when unknown."""
    if features is None:
        return None
    from features.core.manifest import output_info

    return output_info(features, S.FILES["interactions"]).get("fingerprint")


def with_segments(frame: pl.DataFrame, features: Path | None,
                  cache: dict[Path, pl.DataFrame | None] | None = None, *, recorded: str | None = None,
                  log: Log | None = None) -> pl.DataFrame:
    """The predictions with the columns compare segments by, from the features
    folder: cold_item and hist_len of each test impression, and new_user (the
    user has no train event). Unchanged when the folder is unknown or gone,
    and (`recorded`: the fingerprint of its interactions when the run read
    it) when it has been rebuilt since, e.g. by another experiment sharing
    its path: its rows would not be the run's, so no segment rows are given
    (`log` says why). `cache`: segment tables by features folder, so arms
    and seeds that share a features folder read it once."""
    if features is None:
        return frame
    cache = {} if cache is None else cache
    if features not in cache:
        now = segments_fingerprint(features)
        if recorded is not None and now != recorded:
            if log is not None:
                log(f"warning: {features} was rebuilt after the run (interactions fingerprint {now}, the run read "
                    f"{recorded}): no rows by segment; rerun the experiment for them")
            cache[features] = None
        else:
            cache[features] = _segment_table(features)
    seg = cache[features]
    if seg is None:
        return frame.drop([c for c in (S.COLD_ITEM, S.HIST_LEN, NEW_USER) if c in frame.columns])
    keep = [c for c in frame.columns if c not in (S.COLD_ITEM, S.HIST_LEN, NEW_USER)]
    return frame.select(keep).join(seg, on=KEY, how="left", maintain_order="left")


def _segment_table(features: Path) -> pl.DataFrame | None:
    """KEY, cold_item, hist_len, new_user of the test impressions of a features folder (None: gone)."""
    inter = features / S.FILES["interactions"]
    if not inter.is_file():
        return None
    cols = pl.read_parquet(inter, columns=[*KEY, S.SPLIT, S.COLD_ITEM, S.HIST_LEN])
    train_users = cols.filter(pl.col(S.SPLIT) == "train")[S.USER_ID].unique()
    seg = cols.filter(pl.col(S.SPLIT) == "test").select(
        *KEY, S.COLD_ITEM, S.HIST_LEN, (~pl.col(S.USER_ID).is_in(train_users.implode())).alias(NEW_USER))
    return seg.unique(subset=KEY, keep="first")


def log_compare(rows: list[CompareRow], tracker: Tracker, out: Path, *, control: str, predictions: list[ArmPredictions]) -> None:
    """compare.json, the table, an arm-delta plot and ROC curves as artifacts."""
    from recsys import plots

    out.mkdir(parents=True, exist_ok=True)
    (out / COMPARE_JSON).write_text(format_rows(rows, "json", control=control) + "\n")
    (out / "compare.md").write_text(format_rows(rows, "markdown", control=control) + "\n")
    deltas: dict[str, dict[str, tuple[float, float, float]]] = {}
    by_segment: dict[str, dict[str, dict[str, tuple[float, float, float]]]] = {}
    for r in rows:
        if r.arm != control and not any(math.isnan(v) for v in (r.delta, r.ci_low, r.ci_high)):
            if r.segment == ALL:
                deltas.setdefault(r.metric, {})[r.arm] = (r.delta, r.ci_low, r.ci_high)
            else:
                by_segment.setdefault(r.metric, {}).setdefault(r.segment, {})[r.arm] = (r.delta, r.ci_low, r.ci_high)
    files = [out / COMPARE_JSON, out / "compare.md"]
    if deltas:
        files.append(plots.arm_deltas(deltas, out / "arm_deltas.png", control=control))
    for metric, segs in by_segment.items():  # where does each treatment help? one figure per metric
        files.append(plots.arm_deltas(segs, out / f"segments_{metric}.png", control=control,
                                      title=f"{metric}: delta vs {control} per segment"))
    first_seed = {}
    for p in predictions:
        first_seed.setdefault(p.arm, p)
    # a ROC curve needs both classes; an all-negative test split has none to draw
    roc = {a: (p.frame["label"].to_numpy(), p.frame["score"].to_numpy()) for a, p in first_seed.items()
           if p.frame["label"].n_unique() > 1}
    if roc:
        files.append(plots.roc_curves(roc, out / "roc_curves.png", title="Test ROC by arm (click)"))
    for f in files:
        tracker.log_artifact(f, "compare")


def newest_run(tracking_cfg: TrackingConfig, name: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The newest finished run of experiment `name` and what it recorded of
    each arm and seed (`arm_runs.json`: arm, seed, outputs, fingerprints)."""
    from recsys.tracking import connect
    from recsys.tracking.store import resolve_uri, sqlite_path

    uri = resolve_uri(tracking_cfg)
    db = sqlite_path(uri) if uri.startswith("sqlite:") else None
    if db is not None and not db.is_file():  # opening it would create an empty store at a mistyped path
        raise UsageError(f"no finished run of experiment {name!r}: the tracking store {uri} does not exist "
                         "(check tracking.uri / MLFLOW_TRACKING_URI, or run the experiment first)")

    store = connect(tracking_cfg)
    parents = [r for r in store.search_runs(name, stage="pipeline") if r["tags"].get("kind") == "experiment"]
    if not parents:
        raise UsageError(
            f"no finished run of experiment {name!r} in the tracking store {store.uri}: "
            f"run `recsys experiment run experiments/{name}.yaml` first"
        )
    parent = parents[0]
    return parent, json.loads(Path(store.artifact_path(parent["run_id"], ARM_RUNS)).read_text())


def load_experiment_predictions(tracking_cfg: TrackingConfig, name: str,
                                log: Log = _log_err) -> tuple[list[ArmPredictions], dict[str, Any]]:
    """Predictions of the newest finished invocation of experiment `name`,
    each checked for the columns of the experiment's metrics
    (`read_predictions`) and matched against what its run recorded
    (`check_recorded`)."""
    parent, entries = newest_run(tracking_cfg, name)
    metrics = tuple(_parent_spec(tracking_cfg, parent).get("metrics", DEFAULT_METRICS))
    preds = []
    segment_tables: dict[Path, pl.DataFrame | None] = {}
    for entry in entries:
        f = Path(entry["outputs"]) / PREDICTIONS
        if not f.is_file():
            raise DataError(f"predictions of arm {entry['arm']!r} (seed {entry['seed']}) are missing: {f}", file=str(f))
        frame = read_predictions(f, entry["arm"], int(entry["seed"]), metrics)
        check_recorded(entry, frame, f)
        frame = with_segments(frame, Path(entry["features"]) if entry.get("features") else None, segment_tables,
                              recorded=entry.get("features_fingerprint"), log=log)
        preds.append(ArmPredictions(entry["arm"], int(entry["seed"]), frame))
    return preds, parent


def compare_experiment(
    tracking_cfg: TrackingConfig,
    name: str,
    *,
    control: str | None = None,
    metrics: tuple[str, ...] | None = None,
    n_boot: int | None = None,
    log_to_store: bool = True,
) -> tuple[list[CompareRow], str]:
    """Recompute the comparison of the newest run of `name` from its saved
    predictions; log it (plot included) to a new run. Returns rows and control."""
    from recsys.tracking import open_pipeline_run

    if n_boot is not None:
        check_n_boot(n_boot, "n_boot")
    preds, parent = load_experiment_predictions(tracking_cfg, name)
    spec = _parent_spec(tracking_cfg, parent)
    metrics = metrics or tuple(spec.get("metrics", DEFAULT_METRICS))
    arms = sorted({p.arm for p in preds})
    if control is not None and control not in arms:
        raise UsageError(f"--control {control!r}: not an arm of experiment {name!r}; its arms: {', '.join(arms)}")
    control = control or parent["tags"].get("control", "control")
    n_boot = n_boot or int(spec.get("n_boot", 1000))
    order = [a["name"] for a in spec.get("arms", [])]
    preds.sort(key=lambda p: (order.index(p.arm) if p.arm in order else len(order), p.arm, p.seed))
    rows = compare_arms(preds, control=control, metrics=metrics, n_boot=n_boot)
    if log_to_store:
        with open_pipeline_run(tracking_cfg, f"compare {name}", tags={"experiment": name, "control": control, "kind": "compare"},
                               params={"experiment": name, "of_run": parent["run_id"], "n_boot": n_boot, "metrics": list(metrics)},
                               log=lambda _m: None) as run:
            import tempfile

            with tempfile.TemporaryDirectory() as tmp:
                log_compare(rows, run, Path(tmp), control=control, predictions=preds)
    return rows, control


def _parent_spec(tracking_cfg: TrackingConfig, parent: dict[str, Any]) -> dict[str, Any]:
    from recsys.tracking import connect

    try:
        p = connect(tracking_cfg).artifact_path(parent["run_id"], "experiment.json")
    except UsageError:
        return {}
    return json.loads(Path(p).read_text()).get("spec", {})


