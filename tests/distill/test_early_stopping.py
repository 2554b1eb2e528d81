"""Model choice with no valid signal (a tiny catalog whose valid split has no
impressions): before 2026-11-30 the score was a constant 0.0 for the student
(so early stopping kept epoch 0, the least trained model) and NaN for the
sequence teacher (which stopped after `patience` epochs and wrote a bare NaN
into its manifest)."""

from __future__ import annotations

import json

import numpy as np
from torch import nn

from distill.early_stopping import BestOnValid
from features.core.manifest import write_manifest


def test_nan_scores_are_no_scores_every_epoch_runs_and_the_last_is_kept():
    stopper, module = BestOnValid(patience=1), nn.Linear(2, 2)
    for epoch in range(5):
        stopper.update(float("nan"), epoch, module)
        assert not stopper.should_stop
    assert stopper.restore(module, epochs_run=5) == 4
    stopper.update(0.3, 5, module)  # a real score after NaNs counts as usual
    stopper.update(0.2, 6, module)
    assert stopper.should_stop and stopper.best_epoch == 5


def test_selection_score_without_targets_is_nan_not_zero():
    from distill.evaluate.cold_start import Impressions
    from distill.evaluate.retrieval import selection_score

    empty = Impressions(users=np.zeros(0, np.int64), targets=np.zeros(0, np.int64), hist=np.full((0, 2), -1, np.int64),
                        cold=np.zeros(0, bool))
    emb = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
    assert np.isnan(selection_score(emb, empty, q=2, k=3))


def test_manifests_are_strict_json(tmp_path):
    m = write_manifest(tmp_path, job="t", key={"k": 1}, outputs=[], extra={"valid": [float("nan"), 0.5, float("inf")]})
    assert m["valid"] == [None, 0.5, None]
    assert json.loads((tmp_path / "manifest.json").read_text(), parse_constant=lambda c: 1 / 0)["valid"] == [None, 0.5, None]
