"""Remote inputs (s3://, http(s)://, hf://): byte ranges through fsspec, with retries.

A remote parquet file is read as a MajorTOM reader needs it: its size (one HEAD), its footer
(the last FOOTER_BYTES in one ranged GET; Core-S2L2A footers are ~1-1.5 MB), then one ranged
GET per row group, spanning exactly the column chunks read. pyarrow parses from those cached
bytes, so the bytes fetched per tile stay ~1x the tile and no read-ahead is wasted.

S3 uses s3fs with the standard AWS environment (AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL,
AWS_ACCESS_KEY_ID, ...; never logged); HTTP uses fsspec's aiohttp client. hf:// is listed and sized
by huggingface_hub's HfFileSystem (tree API); its bytes are GETs of the file's resolve URL through
huggingface_hub's session and headers (HF_ENDPOINT, HF_TOKEN from the environment, if any; on the
Hub each is a 302 to its CDN and the ranged GET there), tested against tools/hub_server.py.

Transient errors (phileo/remote.py, the same policy as the trainer's streams: HTTP 408/429/5xx,
connection resets, timeouts, truncated bodies) are retried with bounded exponential backoff and
jitter; each retry is logged and counted in RETRIES (per process). When the budget is spent
RemoteUnavailable is raised: not an OSError, so a unit fails as a whole (the build's resume reruns
it) instead of rejecting rows. Missing objects (404) are FileNotFoundError, as for local files.

Environment knobs: PHILEO_REMOTE_RETRIES (default 6), PHILEO_REMOTE_BACKOFF_S (first delay,
default 0.5 s; doubled per failure up to 30 s).
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pyarrow.parquet as pq

from phileo.remote import RetryPolicy, is_transient, s3_filesystem
from phileo.urls import redact, secrets_in
from sharding.errors import InputError

log = logging.getLogger(__name__)

SCHEMES = ("s3://", "http://", "https://", "hf://")
FOOTER_BYTES = int(os.environ.get("PHILEO_REMOTE_FOOTER_KB", 2048)) << 10  # the footer sample, one GET
RETRIES = {"count": 0}  # per process; units report the difference over their run
T = TypeVar("T")


_CREDENTIALS: dict[str, str] = {}  # redacted URL -> the URL as given: memory only, never stored nor logged


def hide_credentials(url: str) -> str:
    """The URL to store and log (phileo/urls.py `redact`); reads of it (or of files under it) use `url`."""
    redacted = redact(url)
    if redacted != url:
        _CREDENTIALS[redacted] = url
    return redacted


def credentials() -> dict[str, str]:
    """The credentials known to this process, for its workers (handed over in memory, never on disk)."""
    return dict(_CREDENTIALS)


def restore_credentials(known: dict[str, str]) -> None:
    _CREDENTIALS.update(known)


def with_credentials(url: str) -> str:
    """The URL to read: the one given with its credentials, or a file under a root given with them."""
    if url in _CREDENTIALS:
        return _CREDENTIALS[url]
    for redacted, real in _CREDENTIALS.items():
        root = redacted.rstrip("/") + "/"
        if url.startswith(root) and "?" not in real:
            return real.rstrip("/") + "/" + url[len(root):]
    return url


def scrub(text: str) -> str:
    """`text` (an error message) with every known credential replaced by ***."""
    for real in _CREDENTIALS.values():
        for secret in secrets_in(real):
            text = text.replace(secret, "***")
    return text


class RemoteUnavailable(RuntimeError):
    """A remote read kept failing after the retry budget; the message names the URL."""


def is_remote(path: str | None) -> bool:
    return bool(path) and str(path).startswith(SCHEMES)


def retry_count() -> int:
    return RETRIES["count"]


def filesystem(url: str):
    """The fsspec filesystem for a URL (cached per process by fsspec)."""
    if url.startswith("s3://"):
        return s3_filesystem()
    if url.startswith("hf://"):
        from huggingface_hub import HfFileSystem, constants

        if constants.is_offline_mode():  # every request would fail, and be retried as a network error
            raise InputError(f"{redact(url)}: HF_HUB_OFFLINE is set, so huggingface_hub reads nothing from the "
                             "Hub; unset it to read hf:// inputs")
        return HfFileSystem()
    import fsspec

    return fsspec.filesystem("https" if url.startswith("https://") else "http")


def with_retries(url: str, what: str, action: Callable[[], T]) -> T:
    """Run `action`, retrying transient errors with backoff + jitter; RemoteUnavailable when spent."""
    policy = RetryPolicy.from_env()
    failures = 0
    while True:
        try:
            return action()
        except Exception as error:  # noqa: BLE001 (classified just below)
            if not is_transient(error):
                raise
            failures += 1
            shown = error.__cause__ if isinstance(error, FileNotFoundError) and error.__cause__ else error
            if failures > policy.retries:
                detail = scrub((str(shown).splitlines() or [""])[0])
                raise RemoteUnavailable(f"{url}: {what} failed after {policy.retries} retries: "
                                        f"{type(shown).__name__}: {detail}") from error
            delay = policy.delay(failures, error)  # a rate-limited server (the Hub's 429) may say how long
            log.warning("%s: %s failed (%s); retry %d/%d in %.2f s", url, what, type(shown).__name__,
                        failures, policy.retries, delay)
            RETRIES["count"] += 1
            time.sleep(delay)


_HF_RESOLVE_URLS: dict[str, str] = {}  # hf:// URL -> its resolve URL (the repo and revision checked once)


def _hf_resolve_url(url: str) -> str:
    """`{endpoint}/datasets/ORG/NAME/resolve/REV/PATH` of an hf:// URL, as HfFileSystem builds it."""
    if url not in _HF_RESOLVE_URLS:
        from huggingface_hub import hf_hub_url

        fs = filesystem(url)
        path = fs.resolve_path(with_credentials(url))  # FileNotFoundError for a missing repo or revision
        _HF_RESOLVE_URLS[url] = hf_hub_url(path.repo_id, path.path_in_repo, repo_type=path.repo_type,
                                           revision=path.revision, endpoint=fs.endpoint)
    return _HF_RESOLVE_URLS[url]


def _hf_get(url: str, start: int | None = None, end: int | None = None) -> bytes:
    """One GET of an hf:// file, or of its bytes [start, end), through huggingface_hub's session, headers
    (HF_TOKEN) and error types (404 -> FileNotFoundError), but not its retry loop: HfFileSystem's files
    retry 429/5xx five times (up to 23 s) inside each of our retries, so a persistent 503 took minutes
    and a 429 was retried and logged by both. with_retries is the one policy, as for s3:// and http://."""
    from huggingface_hub import constants
    from huggingface_hub.errors import EntryNotFoundError
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    headers = build_hf_headers()
    if start is not None:
        headers["Range"] = f"bytes={start}-{end - 1}"
    response = get_session().get(_hf_resolve_url(url), headers=headers, timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT)
    try:
        hf_raise_for_status(response)
    except EntryNotFoundError as error:
        raise FileNotFoundError(f"{url}: not in the repository") from error
    return response.content


def forget_file(url: str) -> None:
    """Drop what is kept of `url` once no more ranges of it will be read (verify streams 23,000 shards)."""
    _HF_RESOLVE_URLS.pop(url, None)


def read_range(url: str, start: int, end: int) -> bytes:
    """Bytes [start, end) of a remote object in one ranged GET (retried; a short body is retried too)."""
    fs, real = filesystem(url), with_credentials(url)

    def fetch() -> bytes:
        data = _hf_get(url, start, end) if url.startswith("hf://") else fs.cat_file(real, start=start, end=end)
        if len(data) != end - start:
            raise ConnectionResetError(f"got {len(data)} bytes of range {start}-{end}")
        return data

    return with_retries(url, f"GET bytes {start}-{end}", fetch)


def read_bytes(url: str) -> bytes:
    """A whole (small) remote object: list files, metadata.parquet."""
    if url.startswith("hf://"):
        return with_retries(url, "GET", lambda: _hf_get(url))
    fs = filesystem(url)
    return with_retries(url, "GET", lambda: fs.cat_file(with_credentials(url)))


def object_size(url: str) -> int:
    fs = filesystem(url)
    return int(with_retries(url, "HEAD", lambda: fs.size(with_credentials(url))))


class RemoteFile(io.RawIOBase):
    """A remote object of known size as a seekable read-only raw file; subclasses say how bytes arrive."""

    def __init__(self, url: str, size: int):
        super().__init__()
        self.url, self.size, self.position = url, size, 0
        self.fetched = 0  # bytes fetched, for tests and logs

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.size}[whence]
        self.position = max(0, base + offset)
        return self.position


class CachedRanges(RemoteFile):
    """A seekable read-only file over byte ranges fetched up front; a miss is one more ranged GET."""

    def __init__(self, url: str, size: int):
        super().__init__(url, size)
        self.blocks: list[tuple[int, bytes]] = []

    def fetch_spans(self, spans: list[tuple[int, int]], keep: bool = True) -> None:
        """One GET per span; `keep=False` first drops every block but the footer (the previous row group)."""
        if not keep:
            self.blocks = self.blocks[:1]
        for start, end in spans:
            self.fetch(start, end)

    def fetch(self, start: int, end: int) -> None:
        """Fetch [start, end) in one GET unless already cached."""
        start, end = max(0, start), min(self.size, end)
        if start < end and not self._cached(start, end):
            self.blocks.append((start, read_range(self.url, start, end)))
            self.fetched += end - start

    def _cached(self, start: int, end: int) -> bytes | None:
        for offset, data in self.blocks:
            if offset <= start and end <= offset + len(data):
                return data[start - offset:end - offset]
        return None

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        end = min(self.size, self.position + len(view))
        if end <= self.position:
            return 0
        data = self._cached(self.position, end)
        if data is None:
            log.debug("%s: cache miss at %d-%d", self.url, self.position, end)
            self.fetch(self.position, end)
            data = self._cached(self.position, end)
        view[:len(data)] = data
        self.position = end
        return len(data)


_FOOTER_CACHE: dict[str, Path | None] = {"dir": None}


def set_footer_cache(directory: Path | str | None) -> None:
    """Keep fetched footers in `directory` (the build's output): the plan and every unit share them."""
    _FOOTER_CACHE["dir"] = Path(directory) if directory else None


def _cached_footer(url: str) -> tuple[int, int, bytes] | None:
    """(object size, footer offset, footer bytes) saved by an earlier open of `url` in this build."""
    if _FOOTER_CACHE["dir"] is None:
        return None
    path = _FOOTER_CACHE["dir"] / f"{hashlib.sha1(url.encode()).hexdigest()}.footer"
    if not path.is_file():
        return None
    data = path.read_bytes()
    size, offset = int.from_bytes(data[:8], "little"), int.from_bytes(data[8:16], "little")
    return size, offset, data[16:]


def _save_footer(url: str, source: CachedRanges) -> None:
    if _FOOTER_CACHE["dir"] is None:
        return
    offset, data = source.blocks[0]
    folder = _FOOTER_CACHE["dir"]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{hashlib.sha1(url.encode()).hexdigest()}.footer"
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(source.size.to_bytes(8, "little") + offset.to_bytes(8, "little") + data)
    os.replace(tmp, path)  # several units may save the same footer: identical bytes, last rename wins


def open_remote_parquet(url: str) -> tuple[pq.ParquetFile, CachedRanges]:
    """A ParquetFile over a remote object: one HEAD and one footer GET (two if the footer is larger).

    With a footer cache set, a footer fetched once in a build (at plan time or by another unit) is
    read from disk: no HEAD, no footer GET, only the row groups' byte ranges.
    """
    cached = _cached_footer(url)
    if cached is not None:
        size, offset, data = cached
        source = CachedRanges(url, size)
        source.blocks.append((offset, data))
        return pq.ParquetFile(source), source
    source = CachedRanges(url, object_size(url))
    source.fetch(source.size - FOOTER_BYTES, source.size)
    footer_length = int.from_bytes(source._cached(source.size - 8, source.size - 4), "little")
    if footer_length + 8 > min(source.size, FOOTER_BYTES):  # larger than the sample: fetch all of it
        source.blocks.clear()
        source.fetch(source.size - footer_length - 8, source.size)
    _save_footer(url, source)
    return pq.ParquetFile(source), source


def column_spans(parquet: pq.ParquetFile, group: int, columns: list[str], max_gap: int = 64 << 10
                 ) -> list[tuple[int, int]]:
    """Byte spans [start, end) of the named columns' chunks in one row group, merged across gaps < max_gap."""
    meta = parquet.metadata.row_group(group)
    spans = []
    for index in range(meta.num_columns):
        chunk = meta.column(index)
        if chunk.path_in_schema in columns:
            first = chunk.data_page_offset
            if chunk.has_dictionary_page and chunk.dictionary_page_offset is not None:
                first = min(first, chunk.dictionary_page_offset)
            spans.append((first, first + chunk.total_compressed_size))
    merged: list[list[int]] = []
    for start, end in sorted(spans):
        if merged and start - merged[-1][1] < max_gap:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(start, end) for start, end in merged]


def open_parquet(path: str) -> tuple[pq.ParquetFile, CachedRanges | None]:
    """Local path -> (ParquetFile, None); URL -> (ParquetFile over cached ranges, the ranges)."""
    if is_remote(path):
        return open_remote_parquet(path)
    return pq.ParquetFile(path), None
