"""Input and output locations given as URIs.

Both engines take plain paths or `file://` URIs. The outputs are single
parquet files plus a manifest written atomically by the driver (a temp folder
renamed into place), which needs a filesystem with an atomic rename that this
process can see: a local or mounted path. Other schemes (hdfs://, s3a://, ...)
are refused with a clear message rather than half supported.
"""

from __future__ import annotations

from urllib.parse import unquote, urlparse

from features.core.errors import UsageError


def local_path(location: str | None, what: str = "path") -> str | None:
    """`file:///x` -> `/x`; a plain path unchanged; None stays None."""
    if location is None:
        return None
    text = str(location)
    if "://" not in text and not text.startswith("file:"):
        return text
    parsed = urlparse(text)
    if parsed.scheme != "file":
        raise UsageError(
            f"{what} {text}: only local paths and file:// URIs are supported (scheme {parsed.scheme!r}); "
            "mount the filesystem, or copy the data to a local path"
        )
    if parsed.netloc not in ("", "localhost"):
        raise UsageError(f"{what} {text}: a file:// URI names no host (file:///abs/path)")
    return unquote(parsed.path)
