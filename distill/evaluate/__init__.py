"""Cold-start evaluation of the teachers and the student.

- cold_start.py: the protocol (held-out items, train pairs and sequences,
  valid/test impressions), `prepare_cold_start`.
- retrieval.py: ranking items for impressions, Recall@k per target group,
  the valid-split choice metric `selection_score`.
- metrics.py: the pure metrics and the teacher-student diagnostics.
"""

from __future__ import annotations

from distill.evaluate.cold_start import ColdStartData, Impressions, prepare_cold_start
from distill.evaluate.metrics import (
    bijective_accuracy,
    diagnostics,
    hits_at_k,
    kendall_tau,
    kmeans_labels,
    neighbour_agreement,
    neighbours,
    nmi,
    recall_at_k,
    topk_overlap,
)
from distill.evaluate.retrieval import (
    GROUPS,
    Retriever,
    embedding_retriever,
    evaluate_retrievers,
    last_items,
    mean_queries,
    rank_items,
    recall_report,
    selection_score,
)

__all__ = [
    "GROUPS",
    "Impressions",
    "ColdStartData",
    "Retriever",
    "prepare_cold_start",
    "hits_at_k",
    "recall_at_k",
    "nmi",
    "kmeans_labels",
    "topk_overlap",
    "kendall_tau",
    "neighbours",
    "neighbour_agreement",
    "bijective_accuracy",
    "last_items",
    "mean_queries",
    "rank_items",
    "recall_report",
    "embedding_retriever",
    "evaluate_retrievers",
    "selection_score",
    "diagnostics",
]
