"""`phileo-shard subset`: select index rows, then copy those samples' tar bytes into a new dataset.

Samples are never re-encoded: each selected sample's tar blocks (headers, data, padding) are
read at the offset the source index gives and appended unchanged to size-capped output
shards, one sample in memory at a time. The bytes are parsed by the shard reader first and must
be exactly the indexed sample, so a stale index is an error, not a corrupt output.
The output is a normal dataset (shards temp + rename, index.parquet with the offsets of the
new tars, an empty rejected.jsonl, manifest.json last) whose manifest names the source dataset
and the query under `derived_from`. `phileo-shard split` writes its two outputs with the
same `write_selection`.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from phileo import __version__
from phileo.schema import SCHEMA_VERSION
from phileo.tarstream import TarFormatError, iter_sample_spans
from phileo.urls import redact_text, url_scheme
from sharding.build.output_dir import claim_output_dir, clear_owned
from sharding.build.output_lock import output_lock
from sharding.build.writer import ShardSummary, ShardWriter, atomic_write
from sharding.dataset.location import DatasetLocation, load_manifest
from sharding.dataset.query import build_query, select
from sharding.errors import InputError
from sharding.layout import INDEX, MANIFEST, REJECTED, SHARDS_DIR

log = logging.getLogger(__name__)

OWNED = {MANIFEST, INDEX, REJECTED, SHARDS_DIR}


class CopiedShardSummary(ShardSummary):
    """Manifest statistics of copied samples; sources without geo fields (PhilEO Bench) are only counted."""

    def add(self, meta: dict) -> None:
        if meta.get("centre_lat") is not None and ("bounds_lonlat" in meta or "corners_lonlat" in meta):
            super().add(meta)
        else:
            self.samples += 1


class RawShardWriter(ShardWriter):
    """Appends samples, as their raw tar blocks, to `shards/000000-{part}.tar` of about `shard_size` bytes."""

    summary_type = CopiedShardSummary

    def __init__(self, shards_dir: Path, shard_size: int):
        super().__init__(shards_dir, unit=0, shard_size=shard_size)

    def copy_sample(self, source: BinaryIO, key: str, size: int, where: str) -> dict:
        """Copy the `size` bytes of sample `key` at `source`'s position; returns its new index location.

        The bytes are parsed (phileo/tarstream.py) before they are written: they must be exactly one
        whole sample with that key, or the index is stale and the copy stops with an InputError.
        """
        data = source.read(size)
        if len(data) != size:
            raise InputError(f"{where}: ends inside sample {key}; run phileo-shard verify on the source")
        try:
            samples = list(iter_sample_spans(io.BytesIO(data), where))
        except TarFormatError as error:
            raise InputError(f"{where}: index entry {key} (+{size} bytes) does not match the members found "
                             f"there ({error}); run phileo-shard verify on the source") from error
        if [(found, span) for found, _, _, span in samples] != [(key, size)]:
            found = ", ".join(found for found, _, _, _ in samples) or "none"
            raise InputError(f"{where}: index entry {key} (+{size} bytes) does not match the member "
                             f"samples found there ({found}); run phileo-shard verify on the source")
        members = samples[0][1]
        try:
            meta = json.loads(members["meta.json"])
        except KeyError:
            raise InputError(f"{where}: sample {key} has no meta.json member") from None
        except ValueError as error:
            raise InputError(f"{where}: {key}.meta.json is not valid JSON ({error})") from error
        if self._file is None:
            self._open_next()
        offset = self._offset
        self._write(data)
        return self._added(key, offset, meta)


def local_output(given: str, flag: str = "--output") -> Path:
    """The output directory given on the command line: local, whatever the source is."""
    if url_scheme(given) is not None and len(url_scheme(given)) > 1:  # len 1: a Windows drive letter
        raise InputError(f"{flag} {redact_text(given)}: outputs are local directories (the source may be remote)")
    return Path(given)


def _check_output(output: Path, source: DatasetLocation, flag: str) -> None:
    """The output is not the source dataset."""
    if not source.remote and output.resolve() == Path(source.root).resolve():
        raise InputError(f"{flag} {output}: is the source dataset; choose another directory")


def prepare_output(output: Path, source: DatasetLocation, overwrite: bool, flag: str = "--output") -> None:
    """An empty or new directory, or a previous output of this command (replaced only with --overwrite)."""
    _check_output(output, source, flag)
    claim_output_dir(output, lambda name: name in OWNED, flag, what="a dataset")
    if (output / MANIFEST).is_file() and not overwrite:
        raise InputError(f"{flag} {output}: already holds a dataset; add --overwrite to replace it")
    clear_owned(output, lambda name: name in OWNED)
    (output / SHARDS_DIR).mkdir()


def read_index(dataset: DatasetLocation) -> tuple[dict, pa.Table]:
    """(manifest, index table) of a finished dataset, local or remote."""
    manifest = load_manifest(dataset)
    index = dataset.parquet(INDEX)
    if index is None:
        raise InputError(f"{dataset}: no {INDEX}")
    return manifest, index.read()


def copy_rows(source: DatasetLocation, rows: pa.Table, output: Path, shard_size: int,
              desc: str) -> tuple[pa.Table, list]:
    """Copy the samples of `rows` (in source shard/offset order); returns (their new index, shard summaries)."""
    rows = rows.sort_by([("shard", "ascending"), ("offset", "ascending")])
    writer = RawShardWriter(output / SHARDS_DIR, shard_size)
    located: dict[str, list] = {"shard": [], "offset": [], "bytes": []}
    total = pc.sum(rows.column("bytes")).as_py() or 0
    current, handle = None, None
    try:
        with tqdm(total=total, unit="B", unit_scale=True, desc=desc, dynamic_ncols=True) as bar:
            for row in (r for batch in rows.select(["key", "shard", "offset", "bytes"]).to_batches()
                        for r in batch.to_pylist()):
                if row["shard"] != current:
                    handle = _reopen(handle, source, row["shard"])
                    current = row["shard"]
                handle.seek(row["offset"])
                entry = writer.copy_sample(handle, row["key"], row["bytes"], f"{source}/{current}@{row['offset']}")
                for name in located:
                    located[name].append(entry[name])
                bar.update(row["bytes"])
        shards = writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        if handle is not None:
            handle.close()
    for name, values in located.items():
        position = rows.schema.get_field_index(name)
        rows = rows.set_column(position, rows.schema.field(name), pa.array(values, rows.schema.field(name).type))
    return rows, shards


def _reopen(handle: BinaryIO | None, source: DatasetLocation, url: str) -> BinaryIO:
    """The shard `url` the source index names, which must lie inside the source dataset; remote: one
    ranged GET per sample read."""
    if handle is not None:
        handle.close()
    path = source.file(url, f"{source}/{INDEX}: shard")
    size = source.size(url)
    if size is None:
        raise InputError(f"{path}: shard named in the source index is missing")
    return source.open_ranges(url, size)


def write_selection(source: DatasetLocation, source_manifest: dict, rows: pa.Table, output: Path, shard_size: int,
                    derived_from: dict, overwrite: bool, flag: str = "--output") -> dict:
    """Write the samples of `rows` as a dataset in `output`; returns its manifest (written last)."""
    if shard_size < 1:
        raise InputError(f"--shard-size {shard_size}: expected a positive number of bytes")
    _check_output(output, source, flag)
    with output_lock(output, flag):
        return _write_selection(source, source_manifest, rows, output, shard_size, derived_from, overwrite, flag)


def _write_selection(source: DatasetLocation, source_manifest: dict, rows: pa.Table, output: Path, shard_size: int,
                     derived_from: dict, overwrite: bool, flag: str) -> dict:
    prepare_output(output, source, overwrite, flag)
    manifest_bytes = source.read_bytes(MANIFEST) or b""
    index, shards = copy_rows(source, rows, output, shard_size, desc=output.name)
    atomic_write(output / INDEX, lambda p: pq.write_table(index, p))
    atomic_write(output / REJECTED, lambda p: p.write_text(""))
    origin = {"dataset": str(source) if source.remote else str(Path(source.root).resolve()),
              "manifest_sha256": hashlib.sha256(manifest_bytes).hexdigest(),
              "samples": source_manifest.get("totals", {}).get("samples"), **derived_from}
    manifest = {"schema": SCHEMA_VERSION, "source": source_manifest.get("source"), "tool_version": __version__,
                "build_args": source_manifest.get("build_args")}
    manifest |= {key: source_manifest[key] for key in ("dataset", "split") if key in source_manifest}
    manifest |= {
        "derived_from": origin, "shards": [shard.to_json() for shard in shards],
        "totals": {"samples": index.num_rows, "shards": len(shards), "bytes": sum(s.bytes for s in shards),
                   "bytes_in": sum(index.column("bytes").to_pylist()), "rejected": 0,
                   "filtered": (origin["samples"] or index.num_rows) - index.num_rows},
        "band_stats": source_manifest.get("band_stats", {}),
        "band_stats_from": "the source dataset (copied, not recomputed for this selection)",
    }
    atomic_write(output / MANIFEST, lambda p: p.write_text(json.dumps(manifest, indent=1)))
    return manifest


@dataclass(frozen=True)
class SubsetArgs:
    source: str
    output: str
    where: str | None = None
    bbox: tuple[float, float, float, float] | None = None
    start: str | None = None
    end: str | None = None
    shard_size: int = 1_000_000_000


@dataclass
class SubsetSummary:
    selected: int
    total: int
    shards: int
    bytes: int
    seconds: float
    output: str

    def line(self) -> str:
        rate = self.selected / self.seconds if self.seconds else 0.0
        return (f"selected {self.selected} of {self.total} samples, wrote {self.shards} shards "
                f"({self.bytes / 1e6:.1f} MB) to {self.output} in {self.seconds:.1f} s ({rate:.1f} samples/s)")


def subset(args: SubsetArgs, overwrite: bool = False) -> SubsetSummary:
    """Run `phileo-shard subset`; InputError on bad input (unknown column, nothing selected, ...)."""
    started = time.monotonic()
    local_output(args.output)
    source = DatasetLocation(args.source)
    source_manifest, index = read_index(source)
    query = build_query(index.schema, args.where, args.bbox, args.start, args.end)
    rows = select(index, query, args.where)
    criteria = {"where": args.where, "bbox": list(args.bbox) if args.bbox else None,
                "start": args.start, "end": args.end}
    if rows.num_rows == 0:
        given = ", ".join(f"--{name} {value!r}" for name, value in criteria.items() if value is not None)
        raise InputError(f"{given or 'the query'}: selects none of the {index.num_rows} samples of {source}")
    log.info("selected %d of %d samples of %s", rows.num_rows, index.num_rows, source)
    manifest = write_selection(source, source_manifest, rows, local_output(args.output), args.shard_size,
                               {"command": "subset", "query": criteria}, overwrite)
    totals = manifest["totals"]
    return SubsetSummary(totals["samples"], index.num_rows, totals["shards"], totals["bytes"],
                         time.monotonic() - started, args.output)
