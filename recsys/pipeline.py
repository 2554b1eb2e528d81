"""The whole chain for an A/B experiment, tracked in MLflow.

    features -> teachers -> distill -> match -> rank/lightgbm per arm and seed -> eval

One parent run per invocation; a nested run per stage. Shared stages run once
per distinct config (arms that agree on `features`, `teachers`, `distill` and
`match` share them) and are reused across invocations when (stage, params,
commit, upstream fingerprints) match a finished run whose outputs are still
intact on disk. Arm runs are tagged `experiment`, `arm` and `seed`; the parent
records which run holds each arm's predictions (`arm_runs.json`), which is
what `recsys experiment compare` reads. Each entry records the predictions'
row count and content fingerprint as the run finished; compare refuses a file
that no longer matches (truncated, replaced, rewritten).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl

from features import schemas as S
from features.core.config import config_hash
from features.core.errors import DataError, UsageError
from features.core.fingerprint import file_fingerprint
from features.core.manifest import read_manifest
from features.core.tracker import Tracker
from recsys.compare import KEY, ArmPredictions, CompareRow, compare_arms, format_rows
from recsys.config import PathsConfig, PipelineConfig
from recsys.eval.metrics import METRICS
from recsys.experiment import MIN_BOOT, LoadedExperiment, load_experiment
from recsys.tracking.config import TrackingConfig

if TYPE_CHECKING:
    from recsys.tracking import NullPipelineRun, PipelineRun

Log = Callable[[str], None]
ARM_RUNS = "arm_runs.json"
COMPARE_JSON = "compare.json"
PREDICTIONS = "predictions.parquet"
DEFAULT_METRICS = ("auc", "gauc", "logloss", "lt_auc", "lt_spearman")


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
    for c in {METRICS[m].score for m in metrics}:
        if frame[c].dtype.is_float():
            bad = np.flatnonzero(np.isnan(frame[c].to_numpy().astype(np.float64)))
            if bad.size:
                raise DataError(f"{where}: {bad.size} NaN score(s)", file=str(path), column=c, rows=bad.tolist())
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


def _log_default(msg: str) -> None:
    print(msg, flush=True)


def output_fingerprint(path: str | Path) -> str:
    """Fingerprint of a stage's output: its manifest's output fingerprints, or
    the content of its main files when it has no manifest."""
    p = Path(path)
    h = hashlib.blake2b(digest_size=16)
    if p.is_file():
        h.update(file_fingerprint(p).encode())
        return h.hexdigest()
    m = read_manifest(p)
    if m is not None and m.get("outputs"):
        for name, info in sorted(m["outputs"].items()):
            h.update(f"{name}:{info.get('fingerprint')}".encode())
        return h.hexdigest()
    files = [f for f in sorted(p.glob("*")) if f.is_file() and f.suffix in {".parquet", ".json"}]
    if not files:
        return ""
    for f in files:
        h.update(f"{f.name}:{file_fingerprint(f)}".encode())
    return h.hexdigest()


@dataclass
class Inputs:
    """Where an arm's shared stages put their outputs, with fingerprints."""

    features: Path
    fingerprints: dict[str, str] = field(default_factory=dict)
    embeddings: Path | None = None
    match: Path | None = None


@dataclass
class ExperimentOutcome:
    name: str
    control: str
    rows: list[CompareRow]
    arm_outputs: dict[str, Path]
    seconds: float


class Pipeline:
    """Runs stages inside one parent run; caches shared stages by their key."""

    def __init__(self, run: PipelineRun | NullPipelineRun, root: Path, log: Log = _log_default, *, progress: bool = True) -> None:
        self.run = run
        self.root = root
        self.log = log
        self.progress = progress
        self._done: dict[str, tuple[Path, str]] = {}  # stage key -> (output, fingerprint)
        self._dirs: dict[str, str] = {}  # stage output dir -> key that owns it
        self._features: dict[str, tuple[Path, str]] = {}  # features config hash -> (output, fingerprint)

    # -- plumbing -------------------------------------------------------------------

    def _dir(self, stage: str, key: str, default: Path) -> Path:
        """`default` for the first config of a stage, `<default>-<hash>` for
        others, so two arms that disagree on a shared stage never overwrite
        each other's outputs."""
        owner = self._dirs.setdefault(str(default), key)
        return default if owner == key else default.with_name(f"{default.name}-{key[:8]}")

    def stage(
        self,
        name: str,
        params: dict[str, Any],
        upstream: dict[str, str],
        out: Path,
        compute: Callable[[Tracker], None],
        *,
        tags: dict[str, Any] | None = None,
        result: Callable[[Path], Path] = lambda p: p,
    ) -> tuple[Path, str]:
        """Run (or reuse) one stage whose outputs go to `out`; returns the
        output path (via `result`) and its fingerprint."""
        key = config_hash({"stage": name, "params": params, "upstream": upstream, "tags": tags or {}})
        if key in self._done:
            return self._done[key]
        with self.run.stage(name, params, upstream, outputs=out, tags=tags) as st:
            if st.reused:
                recorded = (st.info.tags.get("output_fingerprint") if st.info else None) or ""
                reused_out = Path(st.outputs or out)
                if recorded and recorded == output_fingerprint(result(reused_out)):
                    self._done[key] = (result(reused_out), recorded)
                    return self._done[key]
            else:
                t0 = time.perf_counter()
                compute(st)
                fp = output_fingerprint(result(out))
                st.set_outputs(out)
                st.set_tags({"output_fingerprint": fp})
                st.log_metrics({"stage_seconds": time.perf_counter() - t0})
                self._done[key] = (result(out), fp)
                return self._done[key]
        self.log(f"{name}: the reused run's outputs changed on disk; recomputing")
        with self.run.stage(name, params, upstream, outputs=out, tags=tags, reuse=False) as st:
            compute(st)
            fp = output_fingerprint(result(out))
            st.set_outputs(out)
            st.set_tags({"output_fingerprint": fp})
        self._done[key] = (result(out), fp)
        return self._done[key]

    # -- shared stages ----------------------------------------------------------------

    def features(self, cfg: PipelineConfig) -> tuple[Path, str]:
        from features.jobs import build_features, load_source

        params = dataclasses.asdict(cfg.features)
        cache_key = config_hash(params)
        if cache_key in self._features:  # arms sharing a features config: load the source once
            return self._features[cache_key]
        loaded = load_source(cfg.features)
        source = loaded[0]
        upstream = {
            k: t.fingerprint
            for k, t in (("interactions", source.interactions), ("items", source.items), ("users", source.users))
            if t is not None
        }
        out = self._dir("features", cache_key, Path(cfg.paths.resolve("features")))

        def compute(st: Tracker) -> None:
            res = build_features(cfg.features, out, log=self.log, loaded=loaded)
            st.log_metrics({k: v for k, v in res.manifest.get("stats", {}).items() if isinstance(v, (int, float))})
            st.log_artifact(out / "manifest.json")

        self._features[cache_key] = self.stage("features", params, upstream, out, compute)
        return self._features[cache_key]

    def distill(self, cfg: PipelineConfig, features: Path, features_fp: str) -> tuple[Path, str]:
        """Teachers, then the student with its cold-start evaluation; returns
        the item embeddings parquet (every item)."""
        from distill import jobs as D

        seed = cfg.seed
        root = self._dir("distill", config_hash({"t": cfg.teachers, "d": cfg.distill, "s": seed}), cfg.paths.resolve("embeddings").parent)
        t_params = {"teachers": dataclasses.asdict(cfg.teachers), "protocol": _protocol(cfg), "seed": seed}

        def fit_teachers(st: Tracker) -> None:
            D.fit_teachers(features, root / "teachers", cfg.teachers, st, distill=cfg.distill, seed=seed, log=self.log)

        _, t_fp = self.stage("teachers", t_params, {"features": features_fp}, root / "teachers", fit_teachers)
        d_params = {"distill": dataclasses.asdict(cfg.distill), "teachers": dataclasses.asdict(cfg.teachers), "seed": seed}

        def evaluate(st: Tracker) -> None:
            res = D.evaluate(features, root, cfg.distill, st, teachers=cfg.teachers, ablations=cfg.distill.ablations, seed=seed, log=self.log)
            if res.metrics:
                self.log(D.format_metrics(res.metrics, cfg.distill.eval_ks))
            st.log_artifact(root / "metrics.json")
            st.log_artifact(root / "item_embeddings.parquet")

        return self.stage(
            "distill",
            d_params,
            {"features": features_fp, "teachers": t_fp},
            root,
            evaluate,
            result=lambda p: p / "item_embeddings.parquet",
        )

    def match(self, cfg: PipelineConfig, features: Path, features_fp: str, emb: Path, emb_fp: str) -> tuple[Path, str]:
        from features.jobs import build_match_features

        params = dataclasses.asdict(cfg.match)
        out = self._dir("match", config_hash({"m": params, "e": emb_fp}), cfg.paths.resolve("match_features"))

        def compute(st: Tracker) -> None:
            res = build_match_features(features, emb, out, cfg.match, log=self.log, progress=self.progress)
            st.log_artifact(out / "manifest.json")
            st.log_metrics({"seconds": res.seconds})

        return self.stage("match", params, {"features": features_fp, "embeddings": emb_fp}, out, compute)

    def inputs(self, cfg: PipelineConfig, model: str) -> Inputs:
        """Run the shared stages this arm needs."""
        features, f_fp = self.features(cfg)
        inputs = Inputs(features, {"features": f_fp})
        wants_match = cfg.lightgbm.use_match_features if model == "lightgbm" else cfg.ranker.use_match_features
        wants_match = wants_match and cfg.paths.match_features.strip().lower() != "none"
        wants_emb = wants_match or (model == "ranker" and cfg.ranker.use_distilled_embeddings != "off")
        if wants_emb:
            if cfg.paths.embeddings:  # the user's own embeddings file: no distillation
                emb = Path(cfg.paths.embeddings)
                if not emb.is_file():
                    raise UsageError(f"paths.embeddings: {emb} does not exist")
                inputs.embeddings, e_fp = emb, file_fingerprint(emb)
            else:
                inputs.embeddings, e_fp = self.distill(cfg, features, f_fp)
            inputs.fingerprints["embeddings"] = e_fp
        if wants_match:
            inputs.match, m_fp = self.match(cfg, features, f_fp, inputs.embeddings, inputs.fingerprints["embeddings"])
            inputs.fingerprints["match"] = m_fp
        return inputs

    # -- arms ---------------------------------------------------------------------------

    def arm(self, cfg: PipelineConfig, model: str, seed: int, out: Path, tags: dict[str, Any]) -> tuple[Path, str]:
        inputs = self.inputs(cfg, model)
        if model == "lightgbm":
            from recsys.baseline import run_lightgbm

            lgb = dataclasses.replace(cfg.lightgbm, seed=seed)
            params = {"model": "lightgbm", "lightgbm": dataclasses.asdict(lgb), "seed": seed}

            def compute(st: Tracker) -> None:
                st.log_dict(cfg.to_dict(), "config.json")
                run_lightgbm(inputs.features, inputs.match, out, lgb, st, log=self.log)

        else:
            from recsys.train import train_ranker

            paths = PathsConfig(
                root=str(out),
                features=str(inputs.features),
                match_features=str(inputs.match) if inputs.match else "none",
                embeddings=str(inputs.embeddings) if inputs.embeddings else "",
            )
            train = dataclasses.replace(cfg.train, seed=seed, checkpoint_dir=cfg.train.checkpoint_dir, progress=self.progress)
            ns = _RankInputs(paths=paths, ranker=cfg.ranker, train=train, seed=seed)
            params = {"model": "ranker", "ranker": dataclasses.asdict(cfg.ranker), "train": dataclasses.asdict(train), "seed": seed}

            def compute(st: Tracker) -> None:
                st.log_dict(cfg.to_dict(), "config.json")
                metrics = train_ranker(ns, out, tracker=st)
                _rank_plots(out, metrics, cfg, st, inputs.features)

        return self.stage("rank", params, inputs.fingerprints, out, compute, tags=tags)


@dataclass(frozen=True)
class _RankInputs:
    """What `recsys.train.train_ranker` reads from a pipeline config."""

    paths: PathsConfig
    ranker: Any
    train: Any
    seed: int


def _protocol(cfg: PipelineConfig) -> dict[str, Any]:
    """The distill keys that shape the teachers' training data."""
    d = cfg.distill
    return {"holdout_frac": d.holdout_frac, "query_len": d.query_len, "history_len": d.history_len, "select_k": d.select_k}


def _rank_plots(out: Path, metrics: dict[str, Any], cfg: PipelineConfig, tracker: Tracker, features: Path) -> None:
    """Training curves, and for SVD encoders the singular-value spectrum of
    user histories in the trained item table (how much energy rank R keeps)."""
    from recsys import plots

    hist = metrics.get("history") or []
    if hist:
        curves = {k: [h.get(k) for h in hist] for k in ("train_loss", "valid_auc", "valid_gauc", "valid_lt_auc")}
        png = plots.training_curves(curves, out / "training_curves.png", best_epoch=metrics.get("best_epoch"))
        tracker.log_artifact(png, "figures")
    if cfg.ranker.history_encoder.startswith("svd"):
        spectrum = history_spectrum(features, out / "checkpoints" / "best.pt")
        if spectrum is not None:
            png = plots.singular_spectrum(
                spectrum, out / "history_spectrum.png", rank=cfg.ranker.svd_rank, title="User-history spectrum (trained item table)"
            )
            tracker.log_artifact(png, "figures")


def history_spectrum(features: Path, checkpoint: Path, max_users: int = 300) -> np.ndarray | None:
    """Mean normalised singular values of users' history embedding matrices."""
    import torch

    if not checkpoint.is_file() or not (features / S.FILES["sequences"]).is_file():
        return None
    state = torch.load(checkpoint, weights_only=True)
    state = state.get("model", state)
    table = next((v for k, v in state.items() if k.endswith("item_embeddings.embeddings.item.weight")), None)
    if table is None:
        return None
    table = table.double().numpy()  # (I, D)
    item_ids = np.sort(pl.read_parquet(features / S.FILES["items"], columns=[S.ITEM_ID])[S.ITEM_ID].to_numpy())
    seqs = pl.read_parquet(features / S.FILES["sequences"], columns=[S.ITEM_IDS])[S.ITEM_IDS].to_list()
    spectra = []
    for seq in seqs[:max_users]:
        if len(seq) < 2:
            continue
        x = table[np.searchsorted(item_ids, np.asarray(seq))]  # (L, D)
        s = np.linalg.svd(x, compute_uv=False)
        spectra.append(s / max(s.sum(), 1e-12))
    if not spectra:
        return None
    width = max(len(s) for s in spectra)
    return np.mean([np.pad(s, (0, width - len(s))) for s in spectra], axis=0)


# -- experiments ------------------------------------------------------------------------


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
    base = PipelineConfig(exp.baseline, where=str(exp.baseline_path))
    tracking = base.tracking
    for arm, cfg in exp.arm_configs.items():
        if cfg.tracking != tracking:
            raise UsageError(f"arm {arm!r} changes `tracking`: all arms of an experiment log to one store")
    name = exp.name
    root = experiment_root(exp)
    tags = {"experiment": name, "control": exp.spec.control, "kind": "experiment"}
    params = {"experiment": name, "baseline": str(exp.baseline_path), "seeds": list(exp.spec.seeds), "arms": [a.name for a in exp.spec.arms]}
    arm_outputs: dict[str, Path] = {}  # "arm/seedN" -> output folder
    arm_runs: list[dict[str, Any]] = []  # what `compare` reads back: arm, seed, outputs
    predictions: list[ArmPredictions] = []
    fingerprints: dict[str, str] = {}
    with open_pipeline_run(tracking, f"experiment {name}", tags=tags, params=params, log=log) as run:
        run.log_dict({"spec": dataclasses.asdict(exp.spec), "baseline": exp.baseline}, "experiment.json")
        pipe = Pipeline(run, root, log, progress=progress)
        for arm in exp.spec.arms:
            cfg = exp.arm_configs[arm.name]
            for seed in exp.spec.seeds:
                log(f"== arm {arm.name} ({arm.model}), seed {seed}")
                out = root / "experiments" / name / arm.name / f"seed{seed}"
                arm_tags = {"arm": arm.name, "seed": seed, "model": arm.model}
                key = f"{arm.name}/seed{seed}"
                arm_outputs[key], fingerprints[key] = pipe.arm(cfg, arm.model, seed, out, arm_tags)
                f = arm_outputs[key] / PREDICTIONS
                frame = read_predictions(f, arm.name, seed, exp.spec.metrics)
                predictions.append(ArmPredictions(arm.name, seed, frame))
                arm_runs.append({"arm": arm.name, "seed": seed, "outputs": str(arm_outputs[key]),
                                 "rows": frame.height, "fingerprint": file_fingerprint(f)})
        run.log_dict(arm_runs, ARM_RUNS)
        with run.stage("eval", {"n_boot": exp.spec.n_boot, "metrics": list(exp.spec.metrics), "control": exp.spec.control},
                       fingerprints, reuse=False) as st:
            rows = compare_arms(predictions, control=exp.spec.control, metrics=exp.spec.metrics, n_boot=exp.spec.n_boot)
            log_compare(rows, st, root / "experiments" / name, control=exp.spec.control, predictions=predictions)
            values = {f"{r.metric}.{r.arm}": r.value for r in rows} | {f"{r.metric}.{r.arm}.delta": r.delta for r in rows}
            st.log_metrics({k: v for k, v in values.items() if not math.isnan(v)})  # n/a is not a number
    return ExperimentOutcome(name, exp.spec.control, rows, arm_outputs, time.perf_counter() - t0)


def log_compare(rows: list[CompareRow], tracker: Tracker, out: Path, *, control: str, predictions: list[ArmPredictions]) -> None:
    """compare.json, the table, an arm-delta plot and ROC curves as artifacts."""
    from recsys import plots

    out.mkdir(parents=True, exist_ok=True)
    (out / COMPARE_JSON).write_text(format_rows(rows, "json", control=control) + "\n")
    (out / "compare.md").write_text(format_rows(rows, "markdown", control=control) + "\n")
    deltas: dict[str, dict[str, tuple[float, float, float]]] = {}
    for r in rows:
        if r.arm != control and not any(math.isnan(v) for v in (r.delta, r.ci_low, r.ci_high)):
            deltas.setdefault(r.metric, {})[r.arm] = (r.delta, r.ci_low, r.ci_high)
    files = [out / COMPARE_JSON, out / "compare.md"]
    if deltas:
        files.append(plots.arm_deltas(deltas, out / "arm_deltas.png", control=control))
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


def load_experiment_predictions(tracking_cfg: TrackingConfig, name: str) -> tuple[list[ArmPredictions], dict[str, Any]]:
    """Predictions of the newest finished invocation of experiment `name`,
    each checked for the columns of the experiment's metrics
    (`read_predictions`) and matched against what its run recorded
    (`check_recorded`)."""
    from recsys.tracking import connect

    store = connect(tracking_cfg)
    parents = [r for r in store.search_runs(name, stage="pipeline") if r["tags"].get("kind") == "experiment"]
    if not parents:
        raise UsageError(
            f"no finished run of experiment {name!r} in the tracking store {store.uri}: "
            f"run `recsys experiment run experiments/{name}.yaml` first"
        )
    parent = parents[0]
    metrics = tuple(_parent_spec(tracking_cfg, parent).get("metrics", DEFAULT_METRICS))
    path = store.artifact_path(parent["run_id"], ARM_RUNS)
    preds = []
    for entry in json.loads(Path(path).read_text()):
        f = Path(entry["outputs"]) / PREDICTIONS
        if not f.is_file():
            raise DataError(f"predictions of arm {entry['arm']!r} (seed {entry['seed']}) are missing: {f}", file=str(f))
        frame = read_predictions(f, entry["arm"], int(entry["seed"]), metrics)
        check_recorded(entry, frame, f)
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

    if n_boot is not None and n_boot < MIN_BOOT:
        raise UsageError(f"n_boot {n_boot}: need at least {MIN_BOOT} bootstrap replicates for a 95% interval")
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


