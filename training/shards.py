"""Resolve `--shards` into a list of shard URLs with their sample counts.

Accepted: a manifest.json path or http(s) URL (preferred: it gives sample counts), a
dataset directory (its manifest.json, else its *.tar files), a text file of URLs, or a
brace pattern (`dir/shards/{000000..000039}-0000.tar`). Counts of local shards without a
manifest are read from the tar headers (no pixel data is read).
"""

from __future__ import annotations

import json
import posixpath
import tarfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from webdataset.shardlists import expand_urls

REMOTE_PREFIXES = ("http://", "https://", "s3://", "pipe:")


class ShardSpecError(ValueError):
    """`--shards` cannot be resolved; the message names the spec and what is wrong."""


@dataclass(frozen=True)
class ShardInfo:
    url: str
    samples: int


def open_shard(url: str):
    """A readable byte stream of a shard: local file, http(s) (urllib, streamed), else webdataset's gopen."""
    if url.startswith("file://"):
        url = url[len("file://"):]
    if url.startswith(("http://", "https://")):
        return urllib.request.urlopen(url, timeout=60)  # noqa: S310 (user-given URL)
    if not is_remote(url):
        return open(url, "rb")
    from webdataset import gopen

    return gopen(url, "rb")


def is_remote(url: str) -> bool:
    return url.startswith(REMOTE_PREFIXES)


def _read_text(url: str) -> str:
    if is_remote(url):
        with urllib.request.urlopen(url, timeout=60) as response:  # noqa: S310 (user-given URL)
            return response.read().decode("utf-8")
    return Path(url).read_text()


def _join(base: str, relative: str) -> str:
    if is_remote(relative) or relative.startswith("/"):
        return relative
    return posixpath.join(posixpath.dirname(base), relative)


def from_manifest(url: str) -> list[ShardInfo]:
    try:
        manifest = json.loads(_read_text(url))
        return [ShardInfo(_join(url, shard["url"]), int(shard["samples"])) for shard in manifest["shards"]]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ShardSpecError(f"--shards {url}: not a readable phileo-shard manifest ({error})") from error


def count_tar_samples(path: str) -> int:
    """Samples in a local shard = distinct keys, read from tar headers only."""
    keys = set()
    with tarfile.open(path, "r:") as tar:
        for info in tar:
            if info.isfile():
                keys.add(info.name.rsplit("/", 1)[-1].split(".", 1)[0])
    return len(keys)


def _with_counts(spec: str, urls: list[str]) -> list[ShardInfo]:
    shards = []
    for url in urls:
        if is_remote(url):
            raise ShardSpecError(f"--shards {spec}: sample counts of remote shards are unknown; pass the "
                                 "dataset's manifest.json URL instead")
        if not Path(url).is_file():
            raise ShardSpecError(f"--shards {spec}: {url} does not exist")
        try:
            shards.append(ShardInfo(url, count_tar_samples(url)))
        except tarfile.TarError as error:
            raise ShardSpecError(f"--shards {spec}: {url} is not a readable tar ({error})") from error
    return shards


def resolve_shards(spec: str) -> list[ShardInfo]:
    """The shards named by `spec`, in a stable order; ShardSpecError when none or unreadable."""
    if spec.endswith(".json"):
        shards = from_manifest(spec)
    elif not is_remote(spec) and Path(spec).is_dir():
        manifest = Path(spec) / "manifest.json"
        if manifest.is_file():
            shards = from_manifest(str(manifest))
        else:
            shards = _with_counts(spec, sorted(str(p) for p in Path(spec).rglob("*.tar")))
    elif spec.endswith(".txt"):
        lines = [line.split("#", 1)[0].strip() for line in _read_text(spec).splitlines()]
        shards = _with_counts(spec, [_join(spec, line) for line in lines if line])
    else:
        shards = _with_counts(spec, expand_urls(spec))
    if not shards:
        raise ShardSpecError(f"--shards {spec}: no shards found")
    return shards
