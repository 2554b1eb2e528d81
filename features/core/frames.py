"""How the feature jobs run their polars queries: `collect` on the in-memory engine.

polars' default engine ("auto", the streaming engine in polars 2) returns
each column in many small chunks (one per morsel). The feature build gathers
rows (sorts, `over` windows), hands columns to numpy and writes one row group
per chunk, so a chunked frame costs a copy or a slower gather at every step
that follows, and a `rechunk` before the write. The in-memory engine does
not split what it computes: from the sort on, every frame of the build is
one chunk per column. The values are the same on either engine; only the
chunking differs.
"""

from __future__ import annotations

import polars as pl

ENGINE = "in-memory"


def collect(lf: pl.LazyFrame) -> pl.DataFrame:
    """`lf.collect()` on the engine the feature jobs use (single-chunk columns)."""
    return lf.collect(engine=ENGINE)


__all__ = ["ENGINE", "collect"]
