"""One PhilEO Bench work unit (one s2 npy file of one output dataset).

A unit streams its s2 file and the matching label/coords files row by row, checks that they
agree, and writes one sample per patch (the build's patch size, 128 or 224 px). Files of a unit,
in order: shards (temp + rename), `units/<unit>.index.parquet`, `units/<unit>.hist.npz`, and last `units/<unit>.json`:
a unit with that stats file is complete and a resume skips it.
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from phileo.bands import ALL_BANDS, MODEL_BANDS, STACK_MEMBER
from phileo.phileo_bench import PATCH_SIZE, REGRESSION_TASKS, SOURCE, TASKS
from phileo.schema import DEFAULT_CLEVEL, SCHEMA_VERSION, Sample
from sharding.build.unit_files import index_schema, new_histogram, write_unit_files
from sharding.build.writer import ShardSummary, ShardWriter, atomic_write
from sharding.layout import SHARDS_DIR, shard_url, unit_stats_path, unit_temp_files
from sharding.phileo_bench.nshot import check_label_stream, density_scale, scan_label_file
from sharding.sources.phileo_bench import NpyReadError, TileFiles, open_npy

PIXELS_SAMPLED_PER_PATCH = 256
_BAND_ROWS = np.array([ALL_BANDS.index(band) for band in MODEL_BANDS])[:, None]


@dataclass(frozen=True)
class PhilEOBenchUnitOptions:
    """What a worker needs besides the unit; picklable for the process pool."""

    shard_size: int
    clevel: int = DEFAULT_CLEVEL
    density_scale: str = "auto"
    patch_size: int = PATCH_SIZE  # of every s2 file of the build (sources common_patch_size)


@dataclass
class PhilEOBenchShardSummary(ShardSummary):
    """PhilEO Bench patches carry no lon/lat box or timestamp: the manifest counts patches per region."""

    regions: dict[str, int] = field(default_factory=dict)

    def add(self, meta: dict) -> None:
        self.samples += 1
        self.regions[meta["region"]] = self.regions.get(meta["region"], 0) + 1

    def to_json(self) -> dict:
        return {"url": shard_url(self.name), "samples": self.samples, "bytes": self.bytes, "sha256": self.sha256,
                "regions": dict(sorted(self.regions.items()))}


class PhilEOBenchShardWriter(ShardWriter):
    summary_type = PhilEOBenchShardSummary


def phileo_bench_index_schema() -> pa.Schema:
    """The majortom index columns (geo ones null here) plus where each patch came from."""
    extra = [("region", pa.string()), ("bucket", pa.string()), ("split", pa.string()), ("tile", pa.string()),
             ("file", pa.string()), ("row", pa.int64())]
    return pa.schema(list(index_schema()) + [pa.field(name, kind) for name, kind in extra])


def patch_key(tile: TileFiles, row: int) -> str:
    return f"{tile.region}_{tile.split}_{tile.key_offset + row:06d}"


def _reject(file: str, row: int | None, key: str | None, reason: str) -> dict:
    return {"file": file, "row": row, "key": key, "reason": reason}


def _check_s2(stream, tile: TileFiles, size: int) -> str | None:
    if stream.row_shape != (size, size, len(MODEL_BANDS)) or stream.dtype.kind != "u" or stream.dtype.itemsize != 2:
        return (f"{stream.ref.name} is {stream.dtype} {stream.shape}, expected uint16 "
                f"(N, {size}, {size}, {len(MODEL_BANDS)})")
    if stream.rows != tile.rows:
        return f"{stream.ref.name} has {stream.rows} rows, {tile.rows} when planned"
    return None


def _check_coords(stream, rows: int) -> str | None:
    if stream.row_shape != (3,) or stream.dtype.kind not in "fiu":
        return f"{stream.ref.name} is {stream.dtype} {stream.shape}, expected (N, 3) floats"
    if stream.rows != rows:
        return f"{stream.ref.name} has {stream.rows} rows, the s2 file has {rows}"
    return None


def _density_scales(tile: TileFiles, known: dict[str, int], mode: str,
                    size: int) -> tuple[dict[str, int], tuple | None]:
    """Scale per regression label file (a pass over the file for auto); or (file, reason) if unreadable."""
    scales = {}
    for task in REGRESSION_TASKS:
        if task not in tile.labels:
            continue
        if task in known or mode != "auto":
            scales[task] = known.get(task, density_scale(None, mode))
            continue
        scan = scan_label_file(tile.labels[task].to_json(), task, (), size)
        if scan["error"]:
            return scales, (tile.labels[task].display, scan["error"])
        scales[task] = density_scale(scan["max"], mode)
    return scales, None


def _open_streams(tile: TileFiles, stack: ExitStack, size: int) -> tuple[dict, tuple | None]:
    """{name: stream} for s2, each label task and coords; or (file, reason) of the first problem."""
    archives: dict = {}
    refs = {"s2": tile.s2, **tile.labels, **({"coords": tile.coords} if tile.coords else {})}
    streams = {}
    for name, ref in refs.items():
        try:
            streams[name] = stream = open_npy(ref, stack, archives)
        except NpyReadError as error:
            return streams, (ref.display, str(error))
        if name == "s2":
            problem = _check_s2(stream, tile, size)
        elif name == "coords":
            problem = _check_coords(stream, tile.rows)
        else:
            problem = check_label_stream(stream, name, tile.rows, size)
        if problem:
            return streams, (ref.display, problem)
    return streams, None


def _float32_label(array: np.ndarray) -> np.ndarray | None:
    """float32 copy of a label if the conversion is exact (None if not)."""
    converted = array.astype(np.float32)
    if array.dtype != np.float32 and not np.array_equal(converted.astype(array.dtype), array,
                                                        equal_nan=array.dtype.kind == "f"):
        return None
    return converted


def make_sample(tile: TileFiles, row: int, arrays: dict[str, np.ndarray],
                scales: dict[str, int]) -> Sample | tuple[str, str]:
    """The sample of one patch, or (file, reason) when a value cannot be stored losslessly."""
    out = {STACK_MEMBER: np.ascontiguousarray(np.moveaxis(arrays["s2"], -1, 0)).astype(np.uint16, copy=False)}
    size = out[STACK_MEMBER].shape[-1]
    task_labels = {}
    for task, ref in sorted(tile.labels.items()):
        member = TASKS[task][0]
        label = arrays[task].reshape(size, size)
        if task == "landcover":
            if label.size and (label.min() < 0 or label.max() > 255):
                return ref.display, f"{ref.name} row {row}: land-cover code {label.min()}..{label.max()} " \
                                    "does not fit uint8"
            out[member] = label.astype(np.uint8)
            task_labels[task] = {"member": member, "source": ref.display}
            continue
        converted = _float32_label(label)
        if converted is None:
            return ref.display, f"{ref.name} row {row}: {label.dtype} values are not exact in float32"
        out[member] = converted
        task_labels[task] = {"member": member, "source": ref.display, "density_scale": scales[task]}
    coords = None
    if "coords" in arrays:
        coords = [float(value) for value in arrays["coords"]]
        if not all(math.isfinite(value) for value in coords):
            return tile.coords.display, f"{tile.coords.name} row {row}: coords {coords} are not finite"
    key = patch_key(tile, row)
    meta = {"schema": SCHEMA_VERSION, "source": SOURCE, "key": key, "shape": [size, size],
            "bands": {STACK_MEMBER: list(MODEL_BANDS)}, "region": tile.region, "bucket": tile.bucket,
            "split": tile.split, "tile": tile.tile, "file": tile.s2.display, "row": row, "coords": coords,
            "task_labels": task_labels}
    return Sample(key, meta, out)


def iter_patches(tile: TileFiles, rows: list[int] | None, known_scales: dict[str, int],
                 options: PhilEOBenchUnitOptions, stack: ExitStack) -> Iterator[Sample | dict]:
    """Samples of the wanted rows, in order; a reject record (dict) for each row that cannot be stored."""
    wanted = list(range(tile.rows)) if rows is None else rows
    scales, problem = _density_scales(tile, known_scales, options.density_scale, options.patch_size)
    if problem is None:
        streams, problem = _open_streams(tile, stack, options.patch_size)
    if problem is not None:
        for row in wanted:
            yield _reject(problem[0], row, patch_key(tile, row), problem[1])
        return
    iterators = {name: stream.iter_rows(wanted) for name, stream in streams.items()}
    for position, row in enumerate(wanted):
        arrays = {}
        for name, iterator in iterators.items():
            try:
                arrays[name] = next(iterator)[1]
            except NpyReadError as error:
                for lost in wanted[position:]:
                    yield _reject(streams[name].ref.display, lost, patch_key(tile, lost), str(error))
                return
        result = make_sample(tile, row, arrays, scales)
        yield _reject(result[0], row, patch_key(tile, row), result[1]) if isinstance(result, tuple) else result


def _add_histogram(sample: Sample, histogram: np.ndarray) -> None:
    rng = np.random.default_rng(zlib.crc32(sample.key.encode()))
    stack = sample.arrays[STACK_MEMBER]
    ys = rng.integers(0, stack.shape[1], PIXELS_SAMPLED_PER_PATCH)
    xs = rng.integers(0, stack.shape[2], PIXELS_SAMPLED_PER_PATCH)
    np.add.at(histogram, (_BAND_ROWS, stack[:, ys, xs]), 1)


def build_phileo_bench_unit(dataset_dir: str, unit: int, job: dict, options: PhilEOBenchUnitOptions,
                     progress: Callable[[int], None] | None = None) -> dict:
    """Convert one unit; returns (and writes last) its stats. `progress(1)` after each patch."""
    output = Path(dataset_dir)
    for leftover in unit_temp_files(output, unit):
        leftover.unlink(missing_ok=True)
    tile = TileFiles.from_json(job["tile"])
    writer = PhilEOBenchShardWriter(output / SHARDS_DIR, unit, options.shard_size, options.clevel)
    histogram = new_histogram()
    index, rejected, bytes_in = [], [], 0
    try:
        with ExitStack() as stack:
            for outcome in iter_patches(tile, job["rows"], job.get("scales", {}), options, stack):
                if isinstance(outcome, dict):
                    rejected.append(outcome)
                else:
                    _add_histogram(outcome, histogram)
                    bytes_in += sum(array.nbytes for array in outcome.arrays.values())
                    entry = writer.write(outcome)
                    meta = outcome.meta
                    index.append(entry | {name: meta[name] for name in ("region", "bucket", "split", "tile",
                                                                         "file", "row")})
                if progress is not None:
                    progress(1)
        shards = writer.close()
    except BaseException:
        writer.abort()
        raise
    write_unit_files(output, unit, index, phileo_bench_index_schema(), histogram)
    planned = tile.rows if job["rows"] is None else len(job["rows"])
    stats = {"unit": unit, "file": tile.s2.display, "planned": planned, "written": len(index),
             "rejected": rejected, "filtered": 0, "bytes_in": bytes_in,
             "bytes_out": sum(shard.bytes for shard in shards), "shards": [s.to_json() for s in shards]}
    atomic_write(unit_stats_path(output, unit), lambda p: p.write_text(json.dumps(stats)))
    return stats
