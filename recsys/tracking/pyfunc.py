"""The two MLflow pyfunc models. Each wraps a bundle folder (its only artifact)
and the mlflow-free code that reads it (`recsys.serving`).

    RankerModel    request rows -> DataFrame(score, lt_score)      (recsys.serving.ranker)
    StudentModel   items with content columns -> (n, D) float32    (recsys.serving.student)

Loaded with `mlflow.pyfunc.load_model("models:/recsys-ranker@champion")` (or
`mlflow models predict -m ... --env-manager local`) in an environment where
this package is installed; CPU only, offline.
"""

from __future__ import annotations

import warnings
from typing import Any

import mlflow.pyfunc

# MLflow suggests type hints on `predict` for its own input validation when each
# class below is defined: a UserWarning per class on stderr in every run that
# registers a model. The models declare their signatures when logged instead.
# MLflow shows it under its own filter ("once"), so a warnings filter cannot
# hide it: the display is skipped for that message while the classes are defined.
_show_warning = warnings.showwarning


def _hide_type_hint_advice(message: Any, category: Any, *args: Any, **kwargs: Any) -> None:
    if "Add type hints to the `predict` method" not in str(message):
        _show_warning(message, category, *args, **kwargs)


warnings.showwarning = _hide_type_hint_advice

BUNDLE = "bundle"  # the artifact key (and folder name) of the bundle


def _frame(model_input: Any) -> Any:
    """pandas (list cells as numpy arrays, NaN as missing) or polars -> polars."""
    import pandas as pd
    import polars as pl

    if isinstance(model_input, pl.DataFrame):
        return model_input
    return pl.from_pandas(model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input))


class RankerModel(mlflow.pyfunc.PythonModel):
    """Scores request rows (see `recsys.serving.requests`): returns click
    (`score`) and LT-proxy (`lt_score`) probabilities, one row per input row."""

    def load_context(self, context: Any) -> None:
        from recsys.serving.ranker import RankerScorer

        self.scorer = RankerScorer.load(context.artifacts[BUNDLE])

    def predict(self, context, model_input, params=None):  # no type hints: MLflow would derive a signature from them
        out = self.scorer.score(_frame(model_input)).to_pandas()
        if hasattr(model_input, "index"):  # scores line up with the caller's rows (a filtered frame keeps its labels)
            out.index = model_input.index
        return out


class StudentModel(mlflow.pyfunc.PythonModel):
    """Embeds items from their content columns: one L2-normalised float32
    vector per input row (an (n, D) array)."""

    def load_context(self, context: Any) -> None:
        from recsys.serving.student import StudentEncoder

        self.encoder = StudentEncoder.load(context.artifacts[BUNDLE])

    def predict(self, context, model_input, params=None):  # no type hints: MLflow would derive a signature from them
        return self.encoder.embed(_frame(model_input))


warnings.showwarning = _show_warning  # the classes are defined: warnings show as before

__all__ = ["BUNDLE", "RankerModel", "StudentModel"]
