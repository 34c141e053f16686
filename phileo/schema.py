"""The shard sample schema "phileo-shard/1": the only contract between sharding/ and training/.

One sample = one source tile. `encode_sample` turns arrays + metadata into the tar
members of one WebDataset sample; `decode_sample` turns them back and validates them.
Arrays are Blosc2 NDArray contiguous frames (ZSTD + byte shuffle): self-describing,
never pickled, and a window can be decoded without the whole array.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

import blosc2
import numpy as np
import xxhash

from phileo.bands import MODEL_BANDS, RESOLUTION_GROUPS, STACK_MEMBER

SCHEMA_VERSION = "phileo-shard/1"
# the dataset files a reader opens (docs/format.md); the build's other files are sharding/layout.py's
MANIFEST = "manifest.json"
INDEX = "index.parquet"
SHARDS_DIR = "shards"
ARRAY_EXT = "b2nd"
META_MEMBER = "meta.json"
THUMB_MEMBER = "thumb.jpg"
# meta.json field: {member: XXH3-64 (16 hex digits) of its bytes} for every other member, so flipped
# bytes inside a member are a bad sample, not wrong pixels (optional: samples written before it have
# none). XXH3 runs at tens of GB/s: ~0.1 ms for a tile's 6 MB, where crc32 took 1.3 ms.
CHECKSUMS = "xxh3"
CLOUD = "cloud"
LABEL_PREFIX = "label_"
DEFAULT_CLEVEL = 1  # zstd level 1: 4x faster to encode than 5 for <2% more bytes (docs/benchmarks.md)
# Blosc2 blocks span all bands and 640 m x 640 m of ground (64 px at 10 m, 32 px at 20 m), so a
# 128 px crop decodes a few blocks instead of whole rows of the tile (docs/benchmarks.md, loader).
BLOCK_SIDE_10M = 64
_MEMBER_FACTOR = {member: factor for member, (_, factor) in RESOLUTION_GROUPS.items()}

_KEY_RE = re.compile(r"^[A-Za-z0-9_\-]+$")
_LABEL_DTYPES = (np.uint8, np.uint16, np.float32)
REQUIRED_META = ("schema", "source", "key", "shape", "bands")
_GEO_META = ("corners_lonlat", "centre_lat", "centre_lon")
REQUIRED_META_BY_SOURCE = {
    "majortom": _GEO_META + ("grid_cell", "product_id", "timestamp", "crs", "transform", "bounds_lonlat",
                             "cloud_cover", "nodata"),
    "fasttom": _GEO_META + ("grid_cell", "product_id", "timestamp", "crs", "transform", "bounds_lonlat",
                            "cloud_cover", "nodata", "quadrant", "majortom_key"),
    # PhilEO Bench patches carry the benchmark's own coordinates (`coords`), not a georeferenced grid
    "phileo-bench": ("region", "bucket", "split", "tile", "coords", "task_labels"),
}


class SchemaError(ValueError):
    """A sample does not follow the phileo-shard schema; the message names key and member."""


@dataclass
class Sample:
    """One decoded sample: `arrays` maps member names (`s2_10m`, `cloud`, `label_water`...) to arrays."""

    key: str
    meta: dict[str, Any]
    arrays: dict[str, np.ndarray]
    thumb_jpg: bytes | None = None
    extra: dict[str, bytes] = field(default_factory=dict)


def block_shape(member: str, shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """Blocks of a member: every band, BLOCK_SIDE_10M of ground per side; None (Blosc2's choice) for 60 m."""
    side = BLOCK_SIDE_10M // _MEMBER_FACTOR.get(member, 1)
    if side < 16 or len(shape) not in (2, 3):  # 60 m bands: never decoded by the loader
        return None
    return tuple(shape[:-2]) + (min(side, shape[-2]), min(side, shape[-1]))


# c-blosc2 reads these variables on every compression and lets them override the arguments: with
# BLOSC_NTHREADS set (even to 1) the same array encodes to other bytes. Writers refuse to run with any
# of them set (sharding/build/writer.py check_codec_environment); decoding is not affected.
BLOSC_ENCODING_ENV = ("BLOSC_NTHREADS", "BLOSC_CLEVEL", "BLOSC_COMPRESSOR", "BLOSC_SHUFFLE", "BLOSC_DELTA",
                      "BLOSC_TYPESIZE", "BLOSC_BLOCKSIZE", "BLOSC_SPLITMODE")


def encode_array(array: np.ndarray, clevel: int = DEFAULT_CLEVEL, blocks: tuple[int, ...] | None = None) -> bytes:
    """Blosc2 NDArray cframe, ZSTD + byte shuffle (lossless); `blocks`: one chunk split in these blocks.

    One compression thread: multi-threaded Blosc2 writes the same data as different bytes
    run to run, and reruns/resumes must reproduce shards byte for byte (sha256 in the
    manifest). Parallelism comes from build workers instead.
    """
    cparams = blosc2.CParams(codec=blosc2.Codec.ZSTD, clevel=clevel, filters=[blosc2.Filter.SHUFFLE], nthreads=1)
    layout = {} if blocks is None else {"chunks": array.shape, "blocks": blocks}
    return blosc2.asarray(np.ascontiguousarray(array), cparams=cparams, **layout).to_cframe()


def decode_array(data: bytes, window: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """Decode a cframe; `window=(y, x, h, w)` decodes only the blocks of that window of the last 2 axes."""
    array = blosc2.ndarray_from_cframe(data)
    if window is None:
        return array[...]
    y, x, h, w = window
    return array[..., y : y + h, x : x + w]


def expected_shapes(height: int, width: int) -> dict[str, tuple[int, ...]]:
    """Shape of every image member for a tile of `height` x `width` 10 m pixels."""
    shapes: dict[str, tuple[int, ...]] = {
        member: (len(bands), height // factor, width // factor)
        for member, (bands, factor) in RESOLUTION_GROUPS.items()
    }
    shapes[STACK_MEMBER] = (len(MODEL_BANDS), height, width)
    shapes[CLOUD] = (height, width)
    return shapes


def validate_sample(sample: Sample, skipped: frozenset[str] = frozenset()) -> None:
    """Raise SchemaError naming the key and the first problem found (`skipped`: members present, not decoded)."""
    key, meta = sample.key, sample.meta
    if not _KEY_RE.match(key):
        raise SchemaError(f"{key!r}: key must be non-empty and contain only letters, digits, '_' or '-'")
    if meta.get("schema") != SCHEMA_VERSION:
        raise SchemaError(f"{key}: meta.json schema is {meta.get('schema')!r}, expected {SCHEMA_VERSION!r}")
    required = REQUIRED_META + REQUIRED_META_BY_SOURCE.get(meta.get("source", ""), _GEO_META)
    missing = [name for name in required if name not in meta]
    if missing:
        raise SchemaError(f"{key}: meta.json lacks {', '.join(missing)}")
    if meta["key"] != key:
        raise SchemaError(f"{key}: meta.json key is {meta['key']!r}")
    shape = meta["shape"]
    if not (isinstance(shape, list) and len(shape) == 2 and all(type(n) is int and n > 0 for n in shape)):
        raise SchemaError(f"{key}: meta.json shape is {shape!r}, expected [height, width] in pixels")
    height, width = shape
    if STACK_MEMBER not in sample.arrays and (height % 6 or width % 6):
        raise SchemaError(f"{key}: tile shape {height}x{width} is not divisible by 6 (60 m grid)")
    _validate_arrays(key, sample.arrays, expected_shapes(height, width), skipped)


def _validate_arrays(key: str, arrays: dict[str, np.ndarray], shapes: dict[str, tuple[int, ...]],
                     skipped: frozenset[str]) -> None:
    groups = set(RESOLUTION_GROUPS)
    present = groups & (set(arrays) | skipped)
    if STACK_MEMBER in arrays and present:
        raise SchemaError(f"{key}: has both {STACK_MEMBER} and {sorted(present)}")
    if STACK_MEMBER not in arrays and present != groups:
        raise SchemaError(f"{key}: missing image members {sorted(groups - present)}")
    for member, array in arrays.items():
        if member in shapes:
            dtype = np.uint8 if member == CLOUD else np.uint16
            expected = shapes[member]
        elif member.startswith(LABEL_PREFIX):
            dtype, expected = None, shapes[CLOUD]
            if array.dtype not in _LABEL_DTYPES:
                raise SchemaError(f"{key}.{member}: dtype {array.dtype}, expected one of uint8/uint16/float32")
        else:
            raise SchemaError(f"{key}: unknown array member {member!r}")
        if dtype is not None and array.dtype != dtype:
            raise SchemaError(f"{key}.{member}: dtype {array.dtype}, expected {np.dtype(dtype)}")
        if tuple(array.shape) != tuple(expected):
            raise SchemaError(f"{key}.{member}: shape {tuple(array.shape)}, expected {tuple(expected)}")


def encode_sample(sample: Sample, clevel: int = DEFAULT_CLEVEL) -> dict[str, bytes]:
    """Validated tar members of one sample, without the key: {"meta.json": ..., "s2_10m.b2nd": ...}."""
    validate_sample(sample)
    members = {}
    for member in sorted(sample.arrays):
        array = sample.arrays[member]
        members[f"{member}.{ARRAY_EXT}"] = encode_array(array, clevel, block_shape(member, array.shape))
    if sample.thumb_jpg is not None:
        members[THUMB_MEMBER] = sample.thumb_jpg
    meta = sample.meta | {CHECKSUMS: {name: xxhash.xxh3_64_hexdigest(data) for name, data in members.items()}}
    return {META_MEMBER: json.dumps(meta, sort_keys=True).encode("utf-8"), **members}


def _check_digest(key: str, name: str, data: bytes, checksums: dict) -> None:
    expected = checksums.get(name)
    if expected is not None and (digest := xxhash.xxh3_64_hexdigest(data)) != expected:
        raise SchemaError(f"{key}.{name}: xxh3 {digest}, meta.json says {expected} (corrupt member)")


def decode_sample(key: str, members: dict[str, bytes], validate: bool = True,
                  skip: frozenset[str] = frozenset(), lazy: bool = False) -> Sample:
    """Inverse of `encode_sample`; `members` maps extensions ("meta.json", "cloud.b2nd") to bytes.

    Array members named in `skip` (e.g. "s2_60m", unused by the models) must be present but are
    not decompressed, which saves the reader their decode time. `lazy`: arrays are
    `blosc2.NDArray`s with only their headers read (shape and dtype validated), for readers
    that decode just the windows they need.
    """
    if META_MEMBER not in members:
        raise SchemaError(f"{key}: no {META_MEMBER} member")
    try:
        meta = json.loads(members[META_MEMBER].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SchemaError(f"{key}: {META_MEMBER} is not valid UTF-8 JSON ({error})") from error
    if not isinstance(meta, dict):
        raise SchemaError(f"{key}: {META_MEMBER} holds a JSON {type(meta).__name__}, expected an object")
    arrays, extra = {}, {}
    checksums = meta.pop(CHECKSUMS, None)  # checked here; the decoded meta is the one that was encoded
    checksums = checksums if isinstance(checksums, dict) else {}
    for name, data in members.items():
        if name.endswith("." + ARRAY_EXT):
            member = name[: -len(ARRAY_EXT) - 1]
            if member in skip:
                continue
            _check_digest(key, name, data, checksums)
            try:
                arrays[member] = blosc2.ndarray_from_cframe(data) if lazy else decode_array(data)
            except Exception as error:  # blosc2 raises bare RuntimeError/ValueError on bad frames
                raise SchemaError(f"{key}.{name}: not a valid Blosc2 frame ({error})") from error
        elif name not in (META_MEMBER, THUMB_MEMBER):
            extra[name] = data
    sample = Sample(key, meta, arrays, members.get(THUMB_MEMBER), extra)
    if validate:
        validate_sample(sample, frozenset(skip) & {n[: -len(ARRAY_EXT) - 1] for n in members})
    return sample

