"""distill: teachers, the content-only student, cold-start evaluation.

Public API (everything else is private and may change): DistillConfig,
StudentConfig, TeachersConfig, train_student(features_dir, out_dir, cfg).
Names resolve lazily, so importing a submodule stays cheap.
"""

from __future__ import annotations

from features.core.lazy import lazy_exports

# name -> module that defines it: resolved on first use, so `import distill` stays cheap
_EXPORTS = {
    "DistillConfig": "distill.config",
    "StudentConfig": "distill.config",
    "TeachersConfig": "distill.config",
    "train_student": "distill.jobs",
}


__getattr__ = lazy_exports(__name__, _EXPORTS)


__all__ = ["DistillConfig", "StudentConfig", "TeachersConfig", "train_student"]
