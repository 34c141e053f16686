"""URLs found in dataset files are data, never code: which ones a reader follows.

A manifest, an index or a URL list may come from anywhere (manifests are accepted over HTTP),
so the readers of both stages resolve the URLs in them here:

* Only schemes the project reads itself: local paths, `file://`, `http(s)://`, `s3://`. Anything
  else (`pipe:` above all, which WebDataset would run as a shell command) is refused.
* A shard URL recorded by a dataset (manifest entry, index row) is relative to the dataset root and
  must stay inside it: no absolute path, no scheme, no `..` that climbs out.

Every refusal is an `UnsafeURLError` (a ValueError) naming where the URL came from.
"""

from __future__ import annotations

import posixpath
import re

READ_SCHEMES = ("file", "http", "https", "s3")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*):")


class UnsafeURLError(ValueError):
    """A URL from a dataset file that no reader of this project follows; the message says where it came from."""


def url_scheme(url: str) -> str | None:
    """`https` of `https://host/x`, `pipe` of `pipe:curl ...`, None for a plain path."""
    match = _SCHEME.match(url)
    return match.group(1).lower() if match else None


def check_readable(url: str, where: str) -> str:
    """`url` itself when its scheme is one the project reads; UnsafeURLError otherwise."""
    scheme = url_scheme(url)
    if scheme is not None and scheme not in READ_SCHEMES:
        raise UnsafeURLError(f"{where}: {url!r}: {scheme}: URLs are never followed (allowed: local paths, "
                             f"{', '.join(s + '://' for s in READ_SCHEMES)})")
    return url


def inside_root(root: str, relative: str, where: str) -> str:
    """`root`/`relative` for a URL a dataset records; UnsafeURLError unless it stays inside `root`."""
    if url_scheme(relative) is not None or relative.startswith("/") or "\\" in relative or not relative:
        raise UnsafeURLError(f"{where}: {relative!r}: expected a path relative to the dataset root")
    normal = posixpath.normpath(relative)
    if normal in (".", "..") or normal.startswith("../"):
        raise UnsafeURLError(f"{where}: {relative!r}: leaves the dataset root")
    return f"{root.rstrip('/')}/{normal}" if root else normal
