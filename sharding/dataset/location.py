"""Where the dataset tools read a finished dataset from: a local directory, `s3://bucket/prefix`,
`http(s)://host/path` or `hf://datasets/org/name[/path]`.

Remote datasets are read through fsspec (sharding/sources/remote.py `filesystem`, the same clients
as the build's remote inputs) with the project's retry policy (phileo/remote.py): every request is
retried on transient errors, and a failure that persists is `RemoteUnavailable` (exit 1, "rerun").
A missing object is None or a one-line InputError; a server that refuses (HTTP 401/403, S3
AccessDenied) or a host that does not exist is a one-line InputError naming the URL. URLs are shown
only as `phileo/urls.redact` leaves them: credentials given in the dataset URL stay in memory
(`hide_credentials` / `with_credentials`), and the AWS / HF tokens come from the environment.

Shard URLs that a manifest or index records are data: `file()` resolves them with
`phileo/urls.inside_root`, so none leaves the dataset root or names another scheme.
Reads never cache: a shard is streamed front to back in `STREAM_CHUNK` ranged GETs (each byte
fetched once), and a parquet file or a sample is one ranged GET per read.
"""

from __future__ import annotations

import io
import json
import logging
import urllib.parse
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import BinaryIO, TypeVar

import pyarrow.parquet as pq

from phileo.remote import TRANSIENT_MODULES, http_status, unknown_host
from phileo.urls import UnsafeURLError, inside_root, redact_text, url_scheme
from sharding.errors import InputError
from sharding.layout import MANIFEST, SHARDS_DIR
from sharding.sources.remote import (
    RemoteFile,
    RemoteUnavailable,
    filesystem,
    forget_file,
    hide_credentials,
    is_remote,
    read_range,
    scrub,
    with_credentials,
    with_retries,
)

log = logging.getLogger(__name__)

STREAM_CHUNK = 8 << 20  # bytes per ranged GET when a shard is streamed
LOCAL_BUFFER = 1 << 20
EXPECTED = "a local directory, s3://bucket/prefix, http(s)://host/path or hf://datasets/org/name[/path]"
T = TypeVar("T")


def refusal(error: BaseException) -> str | None:
    """Why a remote request failed for good, in a few words, when it is the server refusing or a host that
    does not exist (HTTP 4xx other than 404, S3 AccessDenied, unknown host); None for anything else."""
    cause = error.__cause__ if isinstance(error, FileNotFoundError) and error.__cause__ else error
    status = http_status(cause)
    if status is not None:
        return None if status == 404 else f"HTTP {status}"  # 404: missing, which the caller reports
    if isinstance(cause, PermissionError):
        return "access denied"
    if unknown_host(cause):
        return "unknown host"
    if type(cause).__module__.split(".")[0] in TRANSIENT_MODULES and not isinstance(cause, FileNotFoundError):
        return f"{type(cause).__name__}: {scrub((str(cause).splitlines() or [''])[0])}"
    return None


def refused_is_input_error(url: str, what: str, action: Callable[[], T]) -> T:
    """`action`, whose refusal (see `refusal`) becomes a one-line InputError naming the URL."""
    try:
        return action()
    except RemoteUnavailable:
        raise
    except Exception as error:  # noqa: BLE001 (classified: refusals become one line, the rest re-raised)
        reason = refusal(error)
        if reason is None:
            raise
        raise InputError(f"{url}: {what} failed ({reason})") from None


class DatasetLocation:
    """A finished dataset's root: `file(relative)` names a file in it, the other methods read one."""

    def __init__(self, given: str):
        self.remote = is_remote(given)
        scheme = url_scheme(given)
        if not self.remote and scheme is not None and len(scheme) > 1:  # len 1: a Windows drive letter
            raise InputError(f"{redact_text(given)}: {scheme}:// datasets are not read; expected {EXPECTED}")
        if self.remote and not urllib.parse.urlsplit(given).netloc:
            raise InputError(f"{redact_text(given)}: no host or bucket in the URL; expected {EXPECTED}")
        self.root = hide_credentials(given.rstrip("/")) if self.remote else given

    def __str__(self) -> str:
        return self.root

    @property
    def name(self) -> str:
        """The last part of the root (a map title)."""
        return self.root.rstrip("/").rsplit("/", 1)[-1] if self.remote else Path(self.root).resolve().name

    def file(self, relative: str, where: str) -> str:
        """`relative` (a URL the dataset records) under the root; InputError if it leaves it (phileo/urls.py)."""
        try:
            return inside_root(self.root, relative, where)
        except UnsafeURLError as error:
            raise InputError(str(error)) from None

    def _call(self, url: str, what: str, action: Callable[[], T]) -> T:
        """`action` with retries; a refusal becomes a one-line InputError, a missing object FileNotFoundError."""
        return refused_is_input_error(url, what, lambda: with_retries(url, what, action))

    def size(self, relative: str) -> int | None:
        """Bytes of a file of the dataset, None when it does not exist."""
        url = self.file(relative, str(self))
        if not self.remote:
            path = Path(url)
            return path.stat().st_size if path.is_file() else None
        fs = filesystem(url)
        try:
            return int(self._call(url, "HEAD", lambda: fs.size(with_credentials(url))))
        except FileNotFoundError:
            return None

    def read_bytes(self, relative: str) -> bytes | None:
        """A whole (small) file, None when it does not exist."""
        url = self.file(relative, str(self))
        if not self.remote:
            path = Path(url)
            return path.read_bytes() if path.is_file() else None
        fs = filesystem(url)
        try:
            return self._call(url, "GET", lambda: fs.cat_file(with_credentials(url)))
        except FileNotFoundError:
            return None

    def open_stream(self, relative: str, size: int) -> BinaryIO:
        """A file for reading front to back; remote: `STREAM_CHUNK` ranged GETs, each byte fetched once."""
        url = self.file(relative, str(self))
        if not self.remote:
            return open(url, "rb", buffering=LOCAL_BUFFER)
        return io.BufferedReader(RangeReader(url, size), buffer_size=STREAM_CHUNK)

    def open_ranges(self, relative: str, size: int) -> BinaryIO:
        """A seekable file; remote: every read is one ranged GET of exactly the bytes asked for."""
        url = self.file(relative, str(self))
        if not self.remote:
            return open(url, "rb", buffering=0)
        return RangeReader(url, size)

    def parquet(self, relative: str) -> pq.ParquetFile | None:
        """A parquet file of the dataset (its footer read, row groups on demand); None when missing."""
        size = self.size(relative)
        if size is None:
            return None
        return pq.ParquetFile(self.open_ranges(relative, size), pre_buffer=False)

    def list_shards(self) -> list[str] | None:
        """URLs (`shards/NAME.tar`) of the tar files under shards/; None where the store cannot list (http)."""
        if not self.remote:
            folder = Path(self.root) / SHARDS_DIR
            return [f"{SHARDS_DIR}/{path.name}" for path in sorted(folder.glob("*.tar"))]
        if self.root.startswith(("http://", "https://")):
            return None
        folder = f"{self.root}/{SHARDS_DIR}"
        fs = filesystem(folder)
        fs.invalidate_cache()  # a listing cached earlier in this process (a build's) may be stale
        try:
            found = self._call(folder, "LIST", lambda: fs.ls(with_credentials(folder), detail=False))
        except FileNotFoundError:
            return []
        return sorted(f"{SHARDS_DIR}/{name}" for name in (path.rstrip("/").rsplit("/", 1)[-1] for path in found)
                      if name.endswith(".tar"))


class RangeReader(RemoteFile):
    """A remote object as a seekable raw file: a read is ranged GETs (retried) of exactly its bytes, nothing
    cached. `fetched` counts the bytes received."""

    def close(self) -> None:
        forget_file(self.url)
        super().close()

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        end = min(self.size, self.position + len(view))
        done = 0
        while self.position < end:
            stop = min(end, self.position + STREAM_CHUNK)
            start = self.position
            data = refused_is_input_error(self.url, f"GET bytes {start}-{stop}",  # read_range retries
                                          partial(read_range, self.url, start, stop))
            view[done:done + len(data)] = data
            done += len(data)
            self.position += len(data)
            self.fetched += len(data)
        return done


def load_manifest(location: DatasetLocation) -> dict:
    """The dataset's manifest; its shard URLs checked to stay inside the dataset (phileo/urls.py)."""
    data = location.read_bytes(MANIFEST)
    where = f"{location}/{MANIFEST}"
    if data is None:
        raise InputError(f"{location}: no {MANIFEST} (not a finished phileo-shard dataset)")
    try:
        manifest = json.loads(data)
    except ValueError as error:
        raise InputError(f"{where}: not valid JSON ({error})") from error
    try:
        for number, shard in enumerate(manifest["shards"]):
            location.file(shard["url"], f"{where}: shards[{number}]")
    except (TypeError, KeyError) as error:
        raise InputError(f"{where}: not a phileo-shard manifest (no shards list of url entries: {error!r})") from None
    return manifest


def open_location(given: str | Path | DatasetLocation) -> DatasetLocation:
    return given if isinstance(given, DatasetLocation) else DatasetLocation(str(given))
