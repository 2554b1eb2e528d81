"""Typed errors. Library code raises these; only the CLI turns them into exit codes.

Exit statuses (see `recsys.cli`): `ConfigError`/`UsageError` -> 2, every other
`RecsysError` (bad data) -> 1.
"""

from __future__ import annotations

from collections.abc import Sequence


class RecsysError(Exception):
    """Base of every error this project raises on purpose."""

    exit_code = 1


class UsageError(RecsysError):
    """Wrong command-line usage: a missing flag, a path that does not exist."""

    exit_code = 2


class ConfigError(UsageError):
    """A configuration that cannot be used: unknown key, wrong type, impossible value."""


class DataError(RecsysError):
    """Input data that cannot be used. Names the file, the column and the rows."""

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        column: str | None = None,
        rows: Sequence[int] | None = None,
    ) -> None:
        self.file = file
        self.column = column
        self.rows = list(rows) if rows is not None else None
        parts = []
        if file is not None:
            parts.append(f"file {file}")
        if column is not None:
            parts.append(f"column {column!r}")
        if self.rows:
            shown = ", ".join(str(r) for r in self.rows[:5])
            more = f" (+{len(self.rows) - 5} more)" if len(self.rows) > 5 else ""
            parts.append(f"row{'s' if len(self.rows) > 1 else ''} {shown}{more}")
        where = ": ".join([", ".join(parts)]) if parts else ""
        super().__init__(f"{where}: {message}" if where else message)


class TrainingDiverged(RecsysError):
    """A NaN or infinite loss, gradient, score or learned table: the run stops
    (exit 1) and says where (epoch and step, or the evaluation), instead of
    reporting a meaningless metric."""


class SchemaError(DataError):
    """A file whose columns or dtypes do not match the expected schema."""
