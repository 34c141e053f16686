"""Deterministic generator of small datasets in the format of HF `PhilEO-community/PhilEO-downstream`.

Writes `{region}_{tile}_{split}_{kind}.npy` files: `s2` (N, S, S, 10) uint16 in band order
B02, B03, B04, B08, B05, B06, B07, B8A, B11, B12 (smooth, reflectance-like digital numbers),
`label_roads` / `label_building` (N, S, S, 1) float32 density, `label_lc` (N, S, S, 1)
WorldCover codes, `label_coords` (N, 3) and `label_kg` (ignored by the build). The labels are a
simple learnable function of the pixels: roads = (B04 > B08) * density_scale (a band comparison,
so per-sample normalisation inside the models cannot hide it), buildings =
(B08 > 3300) * density_scale, land cover from B02 ranges (10 / 40 / 50 / 80), so some patches
have no roads or buildings at all. Layouts: plain files ("dir"), two zip archives with the files
in a subfolder ("zip"), or one zip split byte-wise into `.zip.001, .002, ...` ("zip-split").
S (`--size`) is 128 as the main set, or 224 as the benchmark's 224 px sets (data_path_224_10m,
data_path_224_30m). Bad input (a label file with a different row count, an s2 file with a band
missing) is opt-in. Same arguments -> byte-identical files.

    python tools/phileo_bench_fixture.py OUT [--layout dir|zip|zip-split] [--tiles N] [--size 128|224]
"""

from __future__ import annotations

import argparse
import io
import logging
import sys
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

DEFAULT_REGIONS = ("europe", "denmark-1", "east-africa", "tanzania-1", "ghana-1", "japan")
DEFAULT_PATCHES = {"train": 6, "val": 3, "test": 2}
LAYOUTS = ("dir", "zip", "zip-split")
SIZE = 128
BUILDINGS_B08 = 3300  # buildings where B08 (NIR) exceeds this
LANDCOVER_B02 = ((400, 10), (500, 40), (600, 50), (65536, 80))  # (upper B02 bound, WorldCover code)
ARCHIVE_FOLDER = "PhilEO-downstream/data"
# (base DN, gain of the fields u "urban", v "vegetation", w "bright") per band, in file order
BAND_MODEL = ((500, 0, 200, 0), (700, 150, 150, 0), (1500, 1200, 0, 0), (2600, 0, 0, 700), (1100, 200, 0, 100),
              (2000, 0, 0, 400), (2400, 0, 0, 500), (2800, 0, 0, 600), (2200, 300, -100, 0), (1400, 300, 0, 0))
REGION_LATLON = {"europe": (48.0, 10.0), "denmark-1": (56.0, 9.5), "denmark-2": (55.5, 12.0),
                 "east-africa": (-1.0, 36.8), "tanzania-1": (-6.8, 39.2), "ghana-1": (5.6, -0.2),
                 "japan": (35.7, 139.7), "north-america": (40.0, -100.0), "south-america": (-15.0, -55.0)}
_WRITE_DATE = (2024, 1, 1, 0, 0, 0)


def smooth_fields(rng: np.random.Generator, count: int, cells: int = 6, size: int = SIZE) -> np.ndarray:
    """(count, size, size) smooth random fields (bilinear upsampling of a coarse normal grid), std ~0.7."""
    coarse = rng.standard_normal((count, cells + 1, cells + 1))
    position = np.linspace(0, cells, size)
    low = np.minimum(position.astype(int), cells - 1)
    frac = position - low
    rows = coarse[:, low, :] * (1 - frac)[None, :, None] + coarse[:, low + 1, :] * frac[None, :, None]
    return rows[:, :, low] * (1 - frac) + rows[:, :, low + 1] * frac


def make_patches(rng: np.random.Generator, count: int, density_scale: float = 1.0,
                 label_dtype: str = "float32", lc_dtype: str = "uint8", size: int = SIZE) -> dict[str, np.ndarray]:
    """{"s2", "label_roads", "label_building", "label_lc"} arrays of `count` patches of size x size."""
    low, high = np.array([[-1.6], [-0.5], [-2.0]]), np.array([[1.2], [0.5], [0.6]])
    offsets = rng.uniform(low, high, (3, count))[..., None, None]  # some patches have no roads/buildings
    u, v, w = (smooth_fields(rng, count, size=size).astype(np.float32) + offsets[i].astype(np.float32)
               for i in range(3))
    noise = rng.integers(-15, 16, (len(BAND_MODEL), count, size, size), dtype=np.int16)
    channels = np.empty((len(BAND_MODEL), count, size, size), dtype=np.uint16)
    for band, (base, *gains) in enumerate(BAND_MODEL):
        value = noise[band] + np.float32(base)
        for gain, field in zip(gains, (u, v, w)):
            if gain:
                value += np.float32(gain) * field
        np.clip(np.rint(value, out=value), 1, 10000, out=value)
        channels[band] = value
    s2 = np.ascontiguousarray(np.moveaxis(channels, 0, -1))
    b02, b04, b08 = s2[..., 0], s2[..., 2], s2[..., 3]
    landcover = np.zeros(b02.shape, dtype=np.uint8)
    lower = 0
    for upper, code in LANDCOVER_B02:
        landcover[(b02 >= lower) & (b02 < upper)] = code
        lower = upper
    roads = ((b04 > b08).astype(np.float32) * np.float32(density_scale)).astype(label_dtype)
    buildings = ((b08 > BUILDINGS_B08).astype(np.float32) * np.float32(density_scale)).astype(label_dtype)
    return {"s2": s2, "label_roads": roads[..., None], "label_building": buildings[..., None],
            "label_lc": landcover.astype(lc_dtype)[..., None]}


def tile_names(count: int) -> list[str]:
    """Tile ids; every other one holds an underscore, as the real "3_0"."""
    return [f"{i}_0" if i % 2 else str(i) for i in range(count)]


def _coords(region: str, count: int, rng: np.random.Generator) -> np.ndarray:
    lat, lon = REGION_LATLON.get(region, (0.0, 0.0))
    jitter = rng.uniform(-0.5, 0.5, (count, 2))
    return np.column_stack([lat + jitter[:, 0], lon + jitter[:, 1], np.linspace(0, 1, count)]).astype(np.float32)


def generate_arrays(regions: Sequence[str] = DEFAULT_REGIONS, tiles_per_region: int = 2,
                    patches: dict[str, int] | None = None, seed: int = 0, density_scale: float = 1.0,
                    label_dtype: str = "float32", lc_dtype: str = "uint8", with_coords: bool = True,
                    with_kg: bool = True, bad_label_rows: Sequence[str] = (),
                    bad_s2_shape: Sequence[str] = (), size: int = SIZE) -> dict[str, np.ndarray]:
    """{file name: array} of the whole dataset of size x size patches; bad_* name files (without .npy)
    to damage: bad_label_rows loses its last row, bad_s2_shape its last band."""
    patches = DEFAULT_PATCHES if patches is None else patches
    rng = np.random.default_rng(seed)
    files = {}
    for region in regions:
        for tile in tile_names(tiles_per_region):
            for split, count in patches.items():
                stem = f"{region}_{tile}_{split}"
                arrays = make_patches(rng, count, density_scale, label_dtype, lc_dtype, size)
                if with_coords:
                    arrays["label_coords"] = _coords(region, count, rng)
                if with_kg:
                    arrays["label_kg"] = np.full((count, size, size, 1), 7, dtype=np.uint8)
                for kind, array in arrays.items():
                    files[f"{stem}_{kind}.npy"] = array
    for stem in bad_label_rows:
        files[f"{stem}.npy"] = files[f"{stem}.npy"][:-1]
    for stem in bad_s2_shape:
        files[f"{stem}.npy"] = files[f"{stem}.npy"][..., :-1]
    return files


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _write_zip(path: Path, files: dict[str, np.ndarray], compress: bool) -> None:
    method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with zipfile.ZipFile(path, "w") as archive:
        for name in sorted(files):
            info = zipfile.ZipInfo(f"{ARCHIVE_FOLDER}/{name}", date_time=_WRITE_DATE)
            info.compress_type = method
            info.external_attr = 0o644 << 16
            archive.writestr(info, _npy_bytes(files[name]), compress_type=method, compresslevel=1)


def split_file(path: Path, parts: int) -> list[Path]:
    """Split `path` byte-wise into `path.001`, `.002`, ... (about equal sizes) and delete it."""
    data = path.read_bytes()
    size = -(-len(data) // parts)
    written = []
    for number in range(parts):
        part = path.with_name(f"{path.name}.{number + 1:03d}")
        part.write_bytes(data[number * size : (number + 1) * size])
        written.append(part)
    path.unlink()
    return written


def make_phileo_bench_dataset(out: str | Path, regions: Sequence[str] = DEFAULT_REGIONS, tiles_per_region: int = 2,
                              patches: dict[str, int] | None = None, seed: int = 0, layout: str = "dir",
                              density_scale: float = 1.0, compress: bool = True, parts: int = 3,
                              **options) -> dict[str, np.ndarray]:
    """Write the dataset under `out`; returns {npy file name: the array written}.

    `options`: label_dtype, lc_dtype, with_coords, with_kg, bad_label_rows, bad_s2_shape, size
    (see generate_arrays).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r}: expected one of {', '.join(LAYOUTS)}")
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    files = generate_arrays(regions, tiles_per_region, patches, seed, density_scale, **options)
    if layout == "dir":
        for name, array in files.items():
            (root / name).write_bytes(_npy_bytes(array))
    elif layout == "zip":  # two archives: the files of the first half of the regions, then the rest
        first = set(regions[: max(1, len(regions) // 2)])
        halves = ({n: a for n, a in files.items() if n.split("_", 1)[0] in first},
                  {n: a for n, a in files.items() if n.split("_", 1)[0] not in first})
        for letter, half in zip("ab", halves):
            if half:
                _write_zip(root / f"phileo-downstream-{letter}.zip", half, compress)
    else:
        _write_zip(root / "phileo-downstream.zip", files, compress)
        split_file(root / "phileo-downstream.zip", parts)
    logger.info("wrote %d npy files (%s layout) to %s", len(files), layout, root)
    return files


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="output directory")
    parser.add_argument("--layout", choices=LAYOUTS, default="dir")
    parser.add_argument("--tiles", type=int, default=2, help="tiles per region")
    parser.add_argument("--train", type=int, default=DEFAULT_PATCHES["train"], help="train patches per tile")
    parser.add_argument("--val", type=int, default=DEFAULT_PATCHES["val"], help="val patches per tile")
    parser.add_argument("--test", type=int, default=DEFAULT_PATCHES["test"], help="test patches per tile")
    parser.add_argument("--density-scale", type=float, default=1.0, help="label value of a road/building pixel")
    parser.add_argument("--regions", default=",".join(DEFAULT_REGIONS), help="comma-separated regions")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, choices=(128, 224), default=SIZE, help="patch size in pixels")
    parser.add_argument("--stored", action="store_true", help="zip members stored, not deflated")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    files = make_phileo_bench_dataset(args.out, tuple(args.regions.split(",")), args.tiles,
                                      {"train": args.train, "val": args.val, "test": args.test}, args.seed,
                                      args.layout, args.density_scale, not args.stored, size=args.size)
    patches = sum(len(a) for n, a in files.items() if n.endswith("_s2.npy"))
    logger.info("%d patches in %d files", patches, len(files))
    return 0


if __name__ == "__main__":
    sys.exit(main())
