"""Collaborative teachers whose item tables the student distills.

- `ID2ItemTeacher` (id2item.py): user/item ID embeddings in TorchRec tables.
- `Seq2ItemTeacher` (seq2item.py): recent positives -> next positive item.
- `fit_teacher` (fit.py): the epoch loop both train with.

Both follow the scikit-learn contract (`__init__` stores parameters, `fit`
returns self, learned state ends in `_`) and train only on train-split
positives of items that are not held out (distill/evaluate/cold_start.py).
"""

from __future__ import annotations

from distill.config import TEACHER_NAMES, ID2ItemConfig, Seq2ItemConfig, TeachersConfig
from distill.teachers.id2item import ID2ItemTeacher
from distill.teachers.seq2item import Seq2ItemTeacher


__all__ = [
    "TEACHER_NAMES",
    "TeachersConfig",
    "ID2ItemConfig",
    "ID2ItemTeacher",
    "Seq2ItemConfig",
    "Seq2ItemTeacher",
]
