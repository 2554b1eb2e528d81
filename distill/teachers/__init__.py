"""Collaborative teachers whose item tables the student distills.

- `ID2ItemTeacher` (id2item.py): user/item ID embeddings in TorchRec tables.
- `Seq2ItemTeacher` (seq2item.py): recent positives -> next positive item.
- `fit_teacher` (fit.py): the epoch loop both train with.

Both follow the scikit-learn contract (`__init__` stores parameters, `fit`
returns self, learned state ends in `_`) and train only on train-split
positives of items that are not held out (distill/evaluate/cold_start.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from distill.teachers.id2item import ID2ItemConfig, ID2ItemTeacher
from distill.teachers.seq2item import Seq2ItemConfig, Seq2ItemTeacher

TEACHER_NAMES = ("id2item", "seq2item")


@dataclass(frozen=True)
class TeachersConfig:
    """Pipeline section `teachers` (every key documented on its dataclass)."""

    id2item: ID2ItemConfig = field(default_factory=ID2ItemConfig)  # ID-to-item teacher (TorchRec MF)
    seq2item: Seq2ItemConfig = field(default_factory=Seq2ItemConfig)  # sequence-to-item teacher
    seed: int | None = None  # None: the pipeline's `seed` (0 when called as a library)

    def __post_init__(self) -> None:
        if self.seed is not None and self.seed < 0:
            raise ValueError("teachers: seed must be >= 0")


__all__ = [
    "TEACHER_NAMES",
    "TeachersConfig",
    "ID2ItemConfig",
    "ID2ItemTeacher",
    "Seq2ItemConfig",
    "Seq2ItemTeacher",
]
