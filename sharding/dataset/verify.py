"""`phileo-shard verify`: re-read every shard once and check it against manifest and index.

Local or remote (sharding/dataset/location.py), each shard is streamed once: its bytes go through
sha256 and the tar parser (phileo/tarstream.py) in the same pass, as the writer hashes them as it
writes. The index is read a batch at a time in shard order beside the shards, and duplicate keys
are found among 64-bit key hashes (sharding/dataset/verify_rows.py), so memory does not grow with
the dataset. `pixels=False` (`--no-pixels`) checks counts, sizes, offsets and checksums only: no
member is decoded.
"""

from __future__ import annotations

import hashlib
import logging
from typing import BinaryIO

import pyarrow as pa
from tqdm import tqdm

from phileo.schema import SchemaError, decode_sample
from phileo.tarstream import iter_sample_spans
from sharding.dataset.location import STREAM_CHUNK, DatasetLocation, load_manifest, open_location
from sharding.dataset.verify_rows import IndexRows, Problems, SeenKeys, check_shard_rows, row_problems
from sharding.layout import INDEX

log = logging.getLogger(__name__)

__all__ = ["load_manifest", "verify_dataset", "Problems"]


class HashingReader:
    """A stream whose every byte read goes through sha256: the tar parser reads, `drain` hashes the rest."""

    def __init__(self, stream: BinaryIO):
        self.stream, self.digest, self.position = stream, hashlib.sha256(), 0

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.digest.update(data)
        self.position += len(data)
        return data

    def drain(self) -> None:
        while self.read(STREAM_CHUNK):
            pass


def _read_samples(stream: HashingReader, url: str, pixels: bool, found: dict, problems: list[str]) -> int | None:
    """Parse the shard's samples into `found` (key -> (offset, bytes)); their count, None when the tar is
    unreadable."""
    count = 0
    try:
        for key, members, offset, size in iter_sample_spans(stream, url):
            count += 1
            if key in found:
                problems.append(f"{url}: key {key} also in {url}")
            found[key] = (offset, size)
            if pixels:
                try:
                    decode_sample(key, members)
                except SchemaError as error:
                    problems.append(f"{url}: {error}")
    except (ValueError, OSError) as error:  # TarFormatError is a ValueError
        problems.append(f"{url}: unreadable tar after {count} samples ({error})")
        return None
    return count


def check_shard(location: DatasetLocation, shard: dict, pixels: bool = True) -> tuple[list[str], dict]:
    """(problems, {key: (offset, bytes)}) of one shard: presence, size, checksum, count, decodability.

    The shard is read once, front to back; problems come in the order size, checksum, tar, count.
    """
    url = shard["url"]
    size = location.size(url)
    if size is None:
        return [f"{url}: missing"], {}
    problems, found, tar_problems = [], {}, []
    if size != shard["bytes"]:
        problems.append(f"{url}: {size} bytes, manifest says {shard['bytes']}")
    with location.open_stream(url, size) as raw:
        stream = HashingReader(raw)
        samples = _read_samples(stream, url, pixels, found, tar_problems)
        try:
            stream.drain()  # the end-of-archive blocks (and whatever a damaged tar left unparsed)
        except OSError as error:
            tar_problems.append(f"{url}: unreadable after {stream.position} bytes ({error})")
    if stream.position == size and stream.digest.hexdigest() != shard["sha256"]:
        problems.append(f"{url}: sha256 differs from the manifest")
    problems += tar_problems
    if samples is not None and samples != shard["samples"]:
        problems.append(f"{url}: {samples} samples, manifest says {shard['samples']}")
    return problems, found


def _open_index(location: DatasetLocation, manifest: dict, problems: Problems) -> IndexRows | None:
    try:
        index = location.parquet(INDEX)
    except (pa.ArrowException, OSError) as error:  # not a parquet file (a truncated one included)
        problems.add(f"{INDEX}: unreadable ({str(error).splitlines()[0]})")
        return None
    if index is None:
        problems.add(f"{INDEX}: missing")
        return None
    rows = index.metadata.num_rows
    if rows != manifest["totals"]["samples"]:
        problems.add(f"{INDEX}: {rows} rows, manifest says {manifest['totals']['samples']} samples")
    absent = [name for name in ("key", "shard", "offset", "bytes") if name not in index.schema_arrow.names]
    if absent:
        problems.add(f"{INDEX}: no {', '.join(absent)} column")
        return None
    return IndexRows(index)


def verify_dataset(dataset: str | DatasetLocation, pixels: bool = True) -> tuple[Problems, int]:
    """(problems in the order found, distinct sample keys checked)."""
    location = open_location(dataset)
    manifest = load_manifest(location)
    shards = manifest["shards"]
    problems = Problems()
    rows = _open_index(location, manifest, problems)
    shard_number = {shard["url"]: number for number, shard in enumerate(shards)}
    seen = SeenKeys()
    with tqdm(total=sum(shard["bytes"] for shard in shards), unit="B", unit_scale=True, desc="verify") as bar:
        for number, shard in enumerate(shards):
            shard_problems, found = check_shard(location, shard, pixels)
            problems.extend(shard_problems)
            for key, first in seen.add_shard(list(found), number):
                problems.add(f"{shard['url']}: key {key} also in {shards[first]['url']}")
            if rows is not None:
                problems.extend(check_shard_rows(rows, shard["url"], number, shard_number, found))
            bar.update(shard["bytes"])
    while rows is not None and (row := rows.peek()) is not None:  # rows after the last shard's
        rows.advance()
        problems.extend(row_problems(row, None, {}, shard_number.get(row[2])))
    listed = location.list_shards()
    for extra in [] if listed is None else [url for url in listed if url not in shard_number]:
        problems.add(f"{extra}: not in the manifest")
    log.info("verified %d shards of %s (%s)", len(shards), location, "with pixels" if pixels else "no pixels")
    return problems, seen.distinct
