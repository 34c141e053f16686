"""Byte streams of remote shards (s3://, http(s)://) that survive transient errors.

One opener serves manifests, index files and shards. S3 goes through s3fs with the
standard AWS environment (AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION, or any other source botocore knows); HTTP
through urllib. Reads are sequential with a large read-ahead (S3: one ranged GET per
block), so a 1 GB shard is streamed, never held whole in memory.

A transient error (phileo/remote.py: connection reset or refused, timeout, truncated body,
HTTP 408/429/5xx, botocore/aiohttp errors) closes the connection, waits with exponential backoff and jitter
and reopens at the byte offset already consumed (HTTP Range / s3fs seek): the reader sees
every byte exactly once. After PHILEO_REMOTE_RETRIES failures without progress the stream
raises RemoteReadError (an OSError naming the URL and offset); the data loader then skips
the shard and counts it (training/data/loader.py BadDataPolicy). Retries are logged and counted
in `STATS` (per process).

Environment knobs: PHILEO_REMOTE_RETRIES (default 6), PHILEO_REMOTE_BACKOFF_S (first delay,
default 0.5 s; doubled per failure up to 30 s), PHILEO_REMOTE_BLOCK_MB (read-ahead, default 16).
"""

from __future__ import annotations

import io
import logging
import os
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO

from phileo.remote import RetryPolicy, is_transient, s3_filesystem

log = logging.getLogger(__name__)

MB = 1 << 20
BUFFER = 1 * MB  # what the tar reader pulls per call from the resumable stream
TIMEOUT_S = 60


@dataclass
class RemoteStats:
    """Per-process counters (DataLoader workers each have their own)."""

    opened: int = 0  # streams opened
    retries: int = 0  # transient errors recovered by reopening
    resumed: int = 0  # of those, reopened at a byte offset > 0
    failed: int = 0  # streams given up after the retry budget or on a permanent error

    def reset(self) -> None:
        self.opened = self.retries = self.resumed = self.failed = 0


STATS = RemoteStats()
_STATS_LOCK = threading.Lock()


def block_size() -> int:
    return int(float(os.environ.get("PHILEO_REMOTE_BLOCK_MB", 16)) * MB)


class RemoteReadError(OSError):
    """A remote stream gave up: permanent error or retry budget spent. The message names URL and offset."""


class PrematureEnd(OSError):
    """The server closed the body before the announced size (urllib returns b'' silently)."""


Opener = Callable[[int], tuple[IO[bytes], "int | None"]]  # offset -> (stream positioned there, total size)


class ResumableStream(io.RawIOBase):
    """Sequential reader that reopens at the consumed offset after transient errors."""

    def __init__(self, url: str, opener: Opener, policy: RetryPolicy | None = None, start: int = 0,
                 end: int | None = None):
        super().__init__()
        self.url, self._opener, self.policy = url, opener, policy or RetryPolicy.from_env()
        self.position, self.end, self.size, self.retries = start, end, None, 0
        self._inner: IO[bytes] | None = None
        _count("opened")
        self._with_retries("open", self._reopen)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        if self.end is not None:  # a ranged read ends at `end`, whatever the server sends past it
            view = view[: max(self.end - self.position, 0)]
            if not len(view):
                return 0
        count = self._with_retries("read", lambda: self._read_some(view))
        self.position += count
        return count

    def _read_some(self, view: memoryview) -> int:
        if self._inner is None:
            self._reopen()
        data = self._inner.read(len(view))
        if not data and len(view) and self.size is not None and self.position < self.size:
            raise PrematureEnd(f"connection closed at byte {self.position} of {self.size}")
        view[: len(data)] = data
        return len(data)

    def _reopen(self) -> None:
        self._inner, size = self._opener(self.position)
        self.size = size if size is not None else self.size

    def _with_retries(self, what: str, action: Callable[[], object]):
        failures = 0
        while True:
            try:
                return action()
            except Exception as error:  # noqa: BLE001 (classified just below)
                self._drop_connection()
                failures += 1
                if not is_transient(error) or failures > self.policy.retries:
                    _count("failed")
                    spent = f" after {failures - 1} retries" if is_transient(error) else ""
                    raise RemoteReadError(f"{self.url}: {what} failed at byte {self.position}{spent}: "
                                          f"{_one_line(error)}") from error
                wait = self.policy.delay(failures)
                log.warning("%s: %s at byte %d failed (%s); retry %d/%d in %.2f s", self.url, what,
                            self.position, _one_line(error), failures, self.policy.retries, wait)
                self.retries += 1
                _count("retries")
                if self.position:
                    _count("resumed")
                time.sleep(wait)

    def _drop_connection(self) -> None:
        inner, self._inner = self._inner, None
        if inner is not None:
            try:
                inner.close()
            except Exception:  # noqa: BLE001 (a broken connection may fail to close; it is discarded anyway)
                log.debug("%s: closing a failed connection raised", self.url, exc_info=True)

    def close(self) -> None:
        if not self.closed:
            self._drop_connection()
            if self.retries:
                log.info("%s: %d bytes read with %d retries", self.url, self.position, self.retries)
        super().close()


def _count(field: str) -> None:
    with _STATS_LOCK:
        setattr(STATS, field, getattr(STATS, field) + 1)


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def open_http_at(url: str, offset: int, end: int | None = None) -> tuple[IO[bytes], int | None]:
    """A urllib response positioned at `offset` (Range request, up to `end` when given) and the object's size."""
    headers = {"Range": f"bytes={offset}-{'' if end is None else end - 1}"} if offset or end else {}
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers),  # noqa: S310
                                          timeout=TIMEOUT_S)
    except urllib.error.HTTPError as error:
        if error.code == 416 and offset:  # nothing left past offset
            return io.BytesIO(b""), offset
        raise
    length = response.headers.get("Content-Length")
    if response.status == 206:
        match = re.search(r"/(\d+)\s*$", response.headers.get("Content-Range", ""))
        return response, int(match.group(1)) if match else None
    size = int(length) if length is not None else None
    if offset:  # the server ignored Range: skip what was consumed already
        log.warning("%s: server ignored the Range header; skipping %d bytes", url, offset)
        _skip(response, offset)
    return response, size


def _skip(stream: IO[bytes], count: int) -> None:
    while count:
        chunk = stream.read(min(count, BUFFER))
        if not chunk:
            raise PrematureEnd(f"body ended while skipping to byte offset {count}")
        count -= len(chunk)


def open_s3_at(url: str, offset: int, end: int | None = None) -> tuple[IO[bytes], int | None]:
    """An s3fs file with `block_size()` read-ahead (never past `end`), positioned at `offset`, and its size."""
    ahead = block_size() if end is None else max(min(block_size(), end - offset), 1)
    handle = s3_filesystem().open(url, "rb", block_size=ahead, cache_type="readahead")
    if offset:
        handle.seek(offset)
    return handle, handle.size


def open_remote(url: str, policy: RetryPolicy | None = None, start: int = 0,
                end: int | None = None) -> io.BufferedReader:
    """A buffered, resumable read stream of an http(s):// or s3:// object, or of its bytes [start, end)
    (a ranged read); RemoteReadError when unreadable."""
    if url.startswith("s3://"):
        opener = lambda offset: open_s3_at(url, offset, end)  # noqa: E731
    elif url.startswith(("http://", "https://")):
        opener = lambda offset: open_http_at(url, offset, end)  # noqa: E731
    else:
        raise ValueError(f"{url}: not an s3:// or http(s):// URL")
    return io.BufferedReader(ResumableStream(url, opener, policy, start, end), buffer_size=BUFFER)
