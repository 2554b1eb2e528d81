"""recsys: the TorchRec ranker, SVD-attention, A/B experiments, MLflow models.

Public API (everything not listed here is private and may change):

    Ranker, RankerConfig              the two-head TorchRec ranker (logits) over a RankBatch
    SVDAttention, SVDAttentionConfig  target attention over long histories through their SVD
    compare_arms(predictions, control)
                                      per-arm metrics, deltas vs control, bootstrap intervals
    run_experiment(path)              every arm and seed of an experiment file, then compare
    promote_arm(tracking, experiment, arm)
                                      registry alias `champion` on an arm's models (guarded)
    requests_from_features(features)  request rows, the input of the `recsys-ranker` model
    RankerScorer                      a ranker bundle scoring request rows (no MLflow needed)
    encode_items(distill_out, features, items)
                                      embed items with a trained student (cold items too)

The MLflow models (`recsys-ranker`, `recsys-student`; aliases in
recsys.tracking.models) serve the same code:
`mlflow.pyfunc.load_model("models:/recsys-student@champion").predict(items)`.
Names resolve lazily, so `import recsys` stays cheap.

Use it from your own code: `SVDAttention` inside your own TorchRec model,
next to an `EmbeddingCollection` over a `KeyedJaggedTensor` (history and
candidates looked up in one item table):

    >>> import torch
    >>> from torchrec import EmbeddingCollection, KeyedJaggedTensor
    >>> from torchrec.modules.embedding_configs import EmbeddingConfig
    >>> from recsys import SVDAttention, SVDAttentionConfig
    >>> class MyRanker(torch.nn.Module):
    ...     def __init__(self, n_items: int = 100, d: int = 16):
    ...         super().__init__()
    ...         self.items = EmbeddingCollection(tables=[EmbeddingConfig(
    ...             num_embeddings=n_items, embedding_dim=d, name="item", feature_names=["history", "candidate"])])
    ...         self.attention = SVDAttention(SVDAttentionConfig(dim=d, rank=4))
    ...         self.head = torch.nn.Linear(2 * d, 1)
    ...     def forward(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
    ...         emb = self.items(kjt)  # {"history", "candidate"}: JaggedTensors, stride B
    ...         hist, cand = emb["history"], emb["candidate"]
    ...         pad = lambda jt: torch.nn.utils.rnn.pad_sequence(jt.to_dense(), batch_first=True)
    ...         out = self.attention(pad(hist), hist.lengths(), pad(cand))  # (B, C, D)
    ...         mask = torch.arange(out.shape[1])[None, :] < cand.lengths()[:, None]  # (B, C)
    ...         x = torch.cat([cand.values(), out[mask]], dim=1)  # (N, 2D), jagged candidate order
    ...         return self.head(x).squeeze(-1)  # (N,) logits
    >>> kjt = KeyedJaggedTensor(keys=["history", "candidate"],
    ...                         values=torch.tensor([1, 2, 3, 4, 5, 6, 7, 8, 9]),
    ...                         lengths=torch.tensor([5, 2, 1, 1]))  # histories of 5 and 2; 1 candidate each
    >>> MyRanker()(kjt).shape
    torch.Size([2])
"""

from __future__ import annotations

from features.core.lazy import lazy_exports


from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


# name -> module that defines it: resolved on first use, so `import recsys` stays cheap
_EXPORTS = {
    "Ranker": "recsys.models.ranker",
    "RankerConfig": "recsys.config.sections",
    "SVDAttention": "recsys.modules.svd_attention",
    "SVDAttentionConfig": "recsys.modules.svd_attention",
    "run_experiment": "recsys.experiment_run",
    "promote_arm": "recsys.promote",
    "requests_from_features": "recsys.serving",
    "RankerScorer": "recsys.serving",
}


__getattr__ = lazy_exports(__name__, _EXPORTS)


def compare_arms(predictions: Mapping[str, Any], control: str, metrics: Sequence[str] = ("auc", "gauc", "logloss"), *,
            n_boot: int = 1000, seed: int = 0) -> list[Any]:
    """Compare arms from their predictions: {arm: DataFrame with user_id,
    item_id, timestamp, label, score (+ lt_score, returned_1d, lt_observed
    for the LT metrics)}, or {arm: [one DataFrame per seed]}. Returns one
    `CompareRow` per segment, metric and arm (`recsys.compare` is the module
    behind it; `recsys experiment compare` prints the same rows): value, delta vs `control`, a
    95% interval from a bootstrap over users (and seeds), `regression`.

    Example (two arms on 200 synthetic impressions):
        >>> import numpy as np, polars as pl
        >>> from recsys import compare_arms
        >>> rng = np.random.default_rng(0)
        >>> users, label = np.repeat(np.arange(40), 5), rng.integers(0, 2, 200)
        >>> frame = lambda s: pl.DataFrame({"user_id": users, "item_id": np.arange(200), "timestamp": np.zeros(200, int),
        ...                                 "label": label, "score": s})
        >>> rows = compare_arms({"control": frame(rng.random(200)), "better": frame(label * 0.5 + rng.random(200) * 0.5)},
        ...                control="control", metrics=("auc",), n_boot=200)
        >>> r = next(r for r in rows if r.arm == "better" and r.segment == "all")
        >>> r.metric, r.delta > 0, r.ci_low > 0, r.regression
        ('auc', True, True, False)
    """
    from recsys.compare import ArmPredictions
    from recsys.compare import compare_arms as _compare

    preds = []
    for arm, frames in predictions.items():
        frames = frames if isinstance(frames, (list, tuple)) else [frames]
        preds += [ArmPredictions(arm, s, f) for s, f in enumerate(frames)]
    return _compare(preds, control=control, metrics=tuple(metrics), n_boot=n_boot, seed=seed,
                        by_segment=any("cold_item" in p.frame.columns for p in preds))


def encode_items(distill_out: str | Path, features: str | Path, items: Any) -> Any:
    """Embed `items` (a DataFrame with the content columns the student was
    trained on: text and the item fields) with the student trained into the
    distill output folder `distill_out` on the features folder `features`.
    Returns (n, D) float32, L2-normalised; items nobody interacted with and
    field values the catalog never had are fine (the latter read as null).
    The `recsys-student` MLflow model does the same from the registry.

    Example (the student of `recsys distill train`; not run here: it trains one):
        >>> emb = encode_items("artifacts/ml100k/distill", "artifacts/ml100k/features", new_items)  # doctest: +SKIP
        >>> emb.shape  # doctest: +SKIP
        (3, 64)
    """
    import tempfile

    import polars as pl

    from features.core.errors import UsageError
    from recsys.serving import StudentEncoder, export_student

    if not (isinstance(items, pl.DataFrame) or type(items).__name__ == "DataFrame"):  # polars or pandas
        raise TypeError(f"items: a polars or pandas DataFrame of the content columns, got {type(items).__name__}")
    for name, folder in (("distill_out", distill_out), ("features", features)):
        if not Path(folder).is_dir():
            raise UsageError(f"{name} {folder} is not a folder (a `recsys distill train` output and the features "
                             "folder it trained on)")
    if not (Path(distill_out) / "student" / "student.pt").is_file():
        raise UsageError(f"distill_out {distill_out} holds no student/student.pt: is it a `recsys distill train` output?")
    with tempfile.TemporaryDirectory(prefix="recsys-student-") as tmp:
        return StudentEncoder.load(export_student(distill_out, features, Path(tmp) / "bundle")).embed(items)


__all__ = [
    "Ranker", "RankerConfig", "SVDAttention", "SVDAttentionConfig", "compare_arms", "run_experiment", "promote_arm",
    "requests_from_features", "RankerScorer", "encode_items",
]
