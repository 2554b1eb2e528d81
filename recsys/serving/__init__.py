"""Scoring outside the pipeline, free of MLflow: the bundles behind the
`recsys-ranker` and `recsys-student` pyfunc models (recsys.tracking.pyfunc).

    requests  request rows: the ranker's input (`requests_from_features`)
    ranker    `export_ranker` (a rank stage's output -> bundle), `RankerScorer`
    student   `export_student` (a distill stage's output -> bundle), `StudentEncoder`
"""

from recsys.serving.ranker import RankerScorer, export_ranker, request_schema
from recsys.serving.requests import REQUEST_SCHEMA, requests_from_features
from recsys.serving.student import StudentEncoder, export_student

__all__ = [
    "REQUEST_SCHEMA",
    "RankerScorer",
    "StudentEncoder",
    "export_ranker",
    "export_student",
    "request_schema",
    "requests_from_features",
]
