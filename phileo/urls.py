"""URLs found in dataset files are data, never code: which ones a reader follows.

A manifest, an index or a URL list may come from anywhere (manifests are accepted over HTTP),
so the readers of both stages resolve the URLs in them here:

* Only schemes the project reads itself: local paths, `file://`, `http(s)://`, `s3://`. Anything
  else (`pipe:` above all, which WebDataset would run as a shell command) is refused.
* A shard URL recorded by a dataset (manifest entry, index row) is relative to the dataset root and
  must stay inside it: no absolute path, no scheme, no `..` that climbs out.

Every refusal is an `UnsafeURLError` (a ValueError) naming where the URL came from.

And a URL given with credentials (`https://user:password@host/...`, `...?X-Amz-Signature=...`)
is stored and logged only as `redact` leaves it; the credentials stay in memory.
"""

from __future__ import annotations

import posixpath
import re
import urllib.parse

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


# query parameters that carry credentials: presigned S3/GCS URLs, Hub and API tokens, passwords
_SECRET_PARAM = re.compile(r"token|signature|secret|password|passwd|credential|api[-_]?key|^sig$|^key$|^auth", re.I)


def redact(url: str) -> str:
    """`url` without what must never be stored or logged: its userinfo (`user:password@`) and its
    credential-like query parameters. A URL without either is returned unchanged."""
    parts = urllib.parse.urlsplit(url)
    if not parts.scheme or not parts.netloc:
        return url
    host = parts.netloc.rsplit("@", 1)[-1]
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    kept = [(name, value) for name, value in query if not _SECRET_PARAM.search(name)]
    if host == parts.netloc and len(kept) == len(query):
        return url
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, urllib.parse.urlencode(kept), parts.fragment))


def secrets_in(url: str) -> list[str]:
    """The secret strings of `url` (its userinfo, password and credential parameter values), longest first."""
    parts = urllib.parse.urlsplit(url)
    found = []
    if "@" in parts.netloc:
        userinfo = parts.netloc.rsplit("@", 1)[0]
        found += [userinfo, userinfo.partition(":")[2], urllib.parse.unquote(userinfo.partition(":")[2])]
    for name, value in urllib.parse.parse_qsl(parts.query, keep_blank_values=True):
        if _SECRET_PARAM.search(name):
            found += [value, urllib.parse.quote(value, safe="")]
    return sorted({secret for secret in found if len(secret) >= 3}, key=len, reverse=True)


_URL_IN_TEXT = re.compile(r"\b[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"()<>]+")


def redact_text(text: str) -> str:
    """`text` (a message, a log line) with every URL in it redacted."""
    def one(match: re.Match) -> str:
        url = match.group(0)
        stripped = url.rstrip(".,;:")  # sentence punctuation after a URL is not part of it
        return redact(stripped) + url[len(stripped):]

    return _URL_IN_TEXT.sub(one, text)
