"""`phileo-shard verify`: re-read every shard and check it against manifest and index."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
from tqdm import tqdm

from phileo.schema import SchemaError, decode_sample
from phileo.urls import UnsafeURLError, inside_root
from sharding.build.writer import sha256_file
from sharding.dataset.tarread import iter_tar_samples
from sharding.errors import InputError
from sharding.layout import INDEX, MANIFEST, SHARDS_DIR, shard_url

log = logging.getLogger(__name__)


def load_manifest(dataset: Path) -> dict:
    """The dataset's manifest; its shard URLs checked to stay inside the dataset (phileo/urls.py)."""
    path = dataset / MANIFEST
    if not path.is_file():
        raise InputError(f"{dataset}: no {MANIFEST} (not a finished phileo-shard dataset)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise InputError(f"{path}: not valid JSON ({error})") from error
    try:
        for number, shard in enumerate(manifest["shards"]):
            inside_root(str(dataset), shard["url"], f"{path}: shards[{number}]")
    except UnsafeURLError as error:
        raise InputError(str(error)) from None
    except (TypeError, KeyError) as error:
        raise InputError(f"{path}: not a phileo-shard manifest (no shards list of url entries: {error!r})") from None
    return manifest


def check_shard(dataset: Path, shard: dict, locations: dict) -> Iterator[str]:
    """Problems of one shard: presence, size, checksum, sample count, decodability."""
    path = dataset / shard["url"]
    if not path.is_file():
        yield f"{shard['url']}: missing"
        return
    if path.stat().st_size != shard["bytes"]:
        yield f"{shard['url']}: {path.stat().st_size} bytes, manifest says {shard['bytes']}"
    if sha256_file(path) != shard["sha256"]:
        yield f"{shard['url']}: sha256 differs from the manifest"
    count = 0
    try:
        for sample in iter_tar_samples(path):
            count += 1
            if sample.key in locations:
                yield f"{shard['url']}: key {sample.key} also in {locations[sample.key][0]}"
            locations[sample.key] = (shard["url"], sample.offset, sample.size)
            try:
                decode_sample(sample.key, sample.members)
            except SchemaError as error:
                yield f"{shard['url']}: {error}"
    except (ValueError, OSError) as error:  # TarFormatError is a ValueError
        yield f"{shard['url']}: unreadable tar after {count} samples ({error})"
        return
    if count != shard["samples"]:
        yield f"{shard['url']}: {count} samples, manifest says {shard['samples']}"


def check_index(dataset: Path, manifest: dict, locations: dict) -> Iterator[str]:
    path = dataset / INDEX
    if not path.is_file():
        yield f"{INDEX}: missing"
        return
    index = pq.read_table(path, columns=["key", "shard", "offset", "bytes"]).to_pylist()
    if len(index) != manifest["totals"]["samples"]:
        yield f"{INDEX}: {len(index)} rows, manifest says {manifest['totals']['samples']} samples"
    for number, row in enumerate(index):
        where = locations.get(row["key"])
        if where != (row["shard"], row["offset"], row["bytes"]):
            yield (f"{INDEX} row {number} ({row['key']}): points at {row['shard']}@{row['offset']}"
                   f"+{row['bytes']}, the shards hold {where}")


def verify_dataset(dataset: str) -> tuple[list[str], int]:
    """(problems in the order found, samples checked)."""
    root = Path(dataset)
    manifest = load_manifest(root)
    problems: list[str] = []
    locations: dict[str, tuple] = {}
    total_bytes = sum(shard["bytes"] for shard in manifest["shards"])
    with tqdm(total=total_bytes, unit="B", unit_scale=True, desc="verify") as bar:
        for shard in manifest["shards"]:
            problems.extend(check_shard(root, shard, locations))
            bar.update(shard["bytes"])
    listed = {shard["url"] for shard in manifest["shards"]}
    for extra in sorted((root / SHARDS_DIR).glob("*.tar")):
        if shard_url(extra.name) not in listed:
            problems.append(f"{shard_url(extra.name)}: not in the manifest")
    problems.extend(check_index(root, manifest, locations))
    return problems, len(locations)
