"""The kernel at the bottom of the import graph: every package (features,
distill, recsys) builds on it, and it imports none of them.

- `errors`: the typed errors and their exit statuses (RecsysError, UsageError,
  ConfigError, DataError, SchemaError, TrainingDiverged);
- `config`: the strict loader (YAML/JSON -> frozen dataclasses);
- `manifest`: artifact manifests, atomic multi-file output, stale-temp cleanup;
- `fingerprint`: content hashes of files and frames;
- `frames`: `collect` on the engine the feature jobs use (single-chunk columns);
- `paths`: output-path guards (`check_output`);
- `tracker`: the tracking protocol stages log through (`Tracker`, `NullTracker`, `RecordingTracker`, `ForwardingTracker`).
"""
