"""Resolve `--shards` into a list of shard URLs with their sample counts.

Accepted: a manifest.json path or http(s)/s3 URL (preferred: it gives sample counts), a
dataset directory (its manifest.json, else its *.tar files), a text file of URLs, or a
brace pattern (`dir/shards/{000000..000039}-0000.tar`, also of s3:// or https:// URLs).
Counts of local shards without a manifest are read from the tar headers (no pixel data is
read); those of remote shards from the dataset's index.parquet (next to shards/).
Remote reads go through training/data/remote.py: streamed, retried, resumed at the byte offset.
"""

from __future__ import annotations

import io
import json
import posixpath
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from webdataset.shardlists import expand_urls

from phileo.schema import INDEX, MANIFEST
from phileo.tarstream import TarFormatError, count_samples
from phileo.urls import UnsafeURLError, check_readable, inside_root, url_scheme
from training.data.remote import open_remote

RESUMABLE_PREFIXES = ("http://", "https://", "s3://")


class ShardSpecError(ValueError):
    """`--shards` cannot be resolved; the message names the spec and what is wrong."""


@dataclass(frozen=True)
class ShardInfo:
    url: str
    samples: int
    index: str | None = None  # the dataset's index.parquet (byte offsets of samples), when there may be one


def open_shard(url: str, start: int = 0, end: int | None = None):
    """A readable byte stream: local file, or http(s)/s3 streamed with retry + resume. Nothing else:
    URLs are data (phileo/urls.py), so no WebDataset `pipe:` command is ever run.

    From byte `start` (a seek; remotely a ranged read, up to `end` when given). OSError
    (RemoteReadError for http(s)/s3) when the shard cannot be opened; UnsafeURLError for another scheme.
    """
    check_readable(url, "shard")
    if url.startswith("file://"):
        url = url[len("file://"):]
    if url.startswith(RESUMABLE_PREFIXES):
        return open_remote(url, start=start, end=end)
    stream = open(url, "rb")
    if start:
        stream.seek(start)
    return stream


def is_remote(url: str) -> bool:
    return url.startswith(RESUMABLE_PREFIXES)


def _read_text(url: str) -> str:
    if is_remote(url):
        with open_shard(url) as stream:
            return stream.read().decode("utf-8")
    return Path(url).read_text()


def _join(base: str, entry: str, where: str) -> str:
    """An entry of a hand-written URL list: absolute URLs of a readable scheme as given, relative ones
    resolved inside the list's directory."""
    if url_scheme(entry) is not None or entry.startswith("/"):
        return check_readable(entry, where)
    return inside_root(posixpath.dirname(base), entry, where)


def from_manifest(url: str) -> list[ShardInfo]:
    try:
        manifest = json.loads(_read_text(url))
        root = posixpath.dirname(url)
        index = f"{root}/{INDEX}" if is_remote(url) or Path(root, INDEX).is_file() else None
        return [ShardInfo(inside_root(root, shard["url"], f"--shards {url}: shards[{number}]"), int(shard["samples"]),
                          index) for number, shard in enumerate(manifest["shards"])]
    except UnsafeURLError as error:
        raise ShardSpecError(str(error)) from None
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ShardSpecError(f"--shards {url}: not a readable phileo-shard manifest ({error})") from error


def count_tar_samples(path: str) -> int:
    """Samples in a local shard = distinct keys, read from tar headers only."""
    with open(path, "rb") as stream:
        return count_samples(stream)


def index_counts(index_url: str) -> Counter:
    """Samples per shard (relative URL, as in the manifest) from a dataset's index.parquet.

    Reads the whole file (tens of MB for millions of samples); the manifest is the cheaper source.
    """
    import pyarrow.parquet as pq

    with open_shard(index_url) as stream:
        table = pq.read_table(io.BytesIO(stream.read()), columns=["shard"])
    return Counter(table.column("shard").to_pylist())


def _remote_counts(spec: str, urls: list[str]) -> list[ShardInfo]:
    """Counts of remote shards `<root>/shards/<name>.tar` from `<root>/index.parquet`."""
    indexes: dict[str, Counter] = {}
    shards = []
    for url in urls:
        root = posixpath.dirname(posixpath.dirname(url))
        if root not in indexes:
            try:
                indexes[root] = index_counts(f"{root}/{INDEX}")
            except (OSError, ValueError, KeyError) as error:
                raise ShardSpecError(f"--shards {spec}: sample counts of remote shards are unknown ({error}); "
                                     "pass the dataset's manifest.json URL instead") from error
        samples = indexes[root].get(url[len(root) + 1:], 0)
        if not samples:
            raise ShardSpecError(f"--shards {spec}: {url} has no samples in {root}/index.parquet")
        shards.append(ShardInfo(url, samples, f"{root}/{INDEX}"))
    return shards


def _with_counts(spec: str, urls: list[str]) -> list[ShardInfo]:
    if any(is_remote(url) for url in urls):
        if not all(url.startswith(RESUMABLE_PREFIXES) for url in urls):
            raise ShardSpecError(f"--shards {spec}: sample counts of these remote shards are unknown; pass the "
                                 "dataset's manifest.json URL instead")
        return _remote_counts(spec, urls)
    shards = []
    for url in urls:
        if not Path(url).is_file():
            raise ShardSpecError(f"--shards {spec}: {url} does not exist")
        try:
            shards.append(ShardInfo(url, count_tar_samples(url)))
        except (TarFormatError, OSError) as error:
            raise ShardSpecError(f"--shards {spec}: {url} is not a readable tar ({error})") from error
    return shards


def resolve_shards(spec: str) -> list[ShardInfo]:
    """The shards named by `spec`, in a stable order; ShardSpecError when none or unreadable."""
    if spec.endswith(".json"):
        shards = from_manifest(spec)
    elif not is_remote(spec) and Path(spec).is_dir():
        manifest = Path(spec) / MANIFEST
        if manifest.is_file():
            shards = from_manifest(str(manifest))
        else:
            shards = _with_counts(spec, sorted(str(p) for p in Path(spec).rglob("*.tar")))
    elif spec.endswith(".txt"):
        lines = [line.split("#", 1)[0].strip() for line in _read_text(spec).splitlines()]
        try:
            urls = [_join(spec, line, f"--shards {spec} line {number}") for number, line in enumerate(lines, 1) if line]
        except UnsafeURLError as error:
            raise ShardSpecError(str(error)) from None
        shards = _with_counts(spec, urls)
    else:
        try:
            urls = [check_readable(url, f"--shards {spec}") for url in expand_urls(spec)]
        except UnsafeURLError as error:
            raise ShardSpecError(str(error)) from None
        shards = _with_counts(spec, urls)
    if not shards:
        raise ShardSpecError(f"--shards {spec}: no shards found")
    return shards
