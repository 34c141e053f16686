"""`phileo-shard inspect`: per-sample summaries and an RGB preview with the cloud mask outlined."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from phileo.bands import MODEL_BANDS, RESOLUTION_GROUPS, STACK_MEMBER
from phileo.schema import Sample, SchemaError, decode_sample
from phileo.tarstream import TarFormatError
from sharding.dataset.location import DatasetLocation, load_manifest
from sharding.dataset.tarread import TarSample, iter_stream_samples
from sharding.errors import InputError
from sharding.sources.remote import is_remote

PREVIEW_TILE = 256


@dataclass(frozen=True)
class BadData:
    """A sample that does not decode, or a shard that cannot be read: where, and why."""

    where: str
    reason: str


def _shards(path: str) -> tuple[DatasetLocation, list[str]]:
    """(where the shards are, their URLs in it): a dataset (manifest order) or one .tar shard."""
    if is_remote(path) and path.split("?", 1)[0].endswith(".tar"):
        parent, _, name = path.rpartition("/")
        return DatasetLocation(parent), [name]
    if not is_remote(path):
        root = Path(path)
        if root.is_file() and root.suffix == ".tar":
            return DatasetLocation(str(root.parent)), [root.name]
        if not root.is_dir():
            DatasetLocation(path)  # a URL of a scheme never read: that one-line error first
            raise InputError(f"{path}: expected a dataset directory or a .tar shard")
    location = DatasetLocation(path)
    return location, [shard["url"] for shard in load_manifest(location)["shards"]]


def _shard_samples(location: DatasetLocation, url: str) -> Iterator[TarSample]:
    size = location.size(url)
    if size is None:
        raise FileNotFoundError(f"{location}/{url}: missing")
    with location.open_stream(url, size) as stream:
        yield from iter_stream_samples(stream, f"{location}/{url}")


def iter_samples(path: str, max_samples: int) -> Iterator[Sample | BadData]:
    """Samples of a shard tar, or of a dataset (shards in manifest order), local or remote; a bad sample or
    an unreadable shard is yielded as BadData (and counts toward `max_samples`) instead of stopping."""
    location, shards = _shards(path)
    count = 0
    for url in shards:
        where = f"{location}/{url}"
        try:
            for raw in _shard_samples(location, url):
                if count >= max_samples:
                    return
                count += 1
                try:
                    yield decode_sample(raw.key, raw.members)
                except SchemaError as error:
                    yield BadData(where, str(error))
        except (TarFormatError, OSError) as error:  # missing, empty, truncated, not a tar
            count += 1
            yield BadData(where, f"unreadable shard ({type(error).__name__}: {error})")
            if count >= max_samples:
                return


def band_arrays(sample: Sample) -> Iterator[tuple[str, np.ndarray]]:
    if STACK_MEMBER in sample.arrays:
        yield from zip(MODEL_BANDS, sample.arrays[STACK_MEMBER])
        return
    for member, (bands, _) in RESOLUTION_GROUPS.items():
        yield from zip(bands, sample.arrays[member])


def summarize(sample: Sample) -> str:
    meta = sample.meta
    if "centre_lat" in meta:
        where = f"centre {meta['centre_lat']:.4f},{meta['centre_lon']:.4f}"
    else:  # PhilEO Bench patches: a region and the benchmark's coordinates, no georeferenced grid
        where = f"region {meta.get('region', '-')} {meta.get('split', '')} coords {meta.get('coords')}"
    lines = [f"{sample.key}  time {meta.get('timestamp', '-')}  {where}  "
             f"cloud {meta.get('cloud_cover', math.nan):.1f}%  "
             f"nodata {meta.get('nodata', math.nan):.3f}  shape {meta['shape']}  crs {meta.get('crs', '-')}"]
    cells = [f"{band} {int(a.min())}/{int(a.max())}/{a.mean():.0f}" for band, a in band_arrays(sample)]
    lines.append("    min/max/mean  " + "  ".join(cells))
    return "\n".join(lines)


def rgb_preview(sample: Sample, size: int = PREVIEW_TILE) -> np.ndarray:
    """(size, size, 3) uint8: B04/B03/B02 stretched to their 2-98% range, cloud mask outlined in red."""
    if STACK_MEMBER in sample.arrays:
        rgb = sample.arrays[STACK_MEMBER][[2, 1, 0]]
    else:
        rgb = sample.arrays["s2_10m"][[2, 1, 0]]
    step = max(1, rgb.shape[1] // size)
    rgb = rgb[:, ::step, ::step].astype(np.float32)
    low, high = np.percentile(rgb[rgb > 0], [2, 98]) if (rgb > 0).any() else (0.0, 1.0)
    image = np.clip((rgb - low) / max(high - low, 1e-6) * 255, 0, 255).astype(np.uint8).transpose(1, 2, 0)
    cloud = sample.arrays.get("cloud")
    if cloud is not None:
        mask = cloud[::step, ::step] > 0
        edge = mask & ~(np.roll(mask, 1, 0) & np.roll(mask, -1, 0) & np.roll(mask, 1, 1) & np.roll(mask, -1, 1))
        image[edge] = (255, 0, 0)
    return image


def save_preview(samples: list[Sample], path: str) -> None:
    """Tile the previews of `samples` in a grid and save as PNG."""
    from PIL import Image

    if not samples:
        raise InputError(f"--preview {path}: no samples to preview")
    tiles = [rgb_preview(sample) for sample in samples]
    columns = min(4, len(tiles))
    rows = math.ceil(len(tiles) / columns)
    side = max(t.shape[0] for t in tiles)
    canvas = np.zeros((rows * side, columns * side, 3), dtype=np.uint8)
    for number, tile in enumerate(tiles):
        y, x = divmod(number, columns)
        canvas[y * side : y * side + tile.shape[0], x * side : x * side + tile.shape[1]] = tile
    Image.fromarray(canvas).save(path)
