"""Benchmark Blosc2 block layouts of the shard arrays: bytes, encode/decode speed, crop decoding.

On the same MajorTOM-format tiles (generated, or --input parquet of real rows), every layout encodes
s2_10m / s2_20m / cloud at the schema's ZSTD level, one Blosc2 thread, and is measured on:
compressed bytes vs the source GeoTIFF band bytes; encode and whole-array decode in MB/s of raw
pixels; and the loader's decode of K random 128 px crops per tile (training/data/windows.py: only the
blocks under the crops) as crops/s. Ratios are against Blosc2's own layout (row blocks), the layout
shards had before `phileo/schema.py block_shape`. Prints Markdown; --write-docs updates docs/benchmarks.md.

    python tools/bench_blocks.py [--tiles 8] [--input DIR] [--write-docs]
"""

from __future__ import annotations

import argparse
import datetime
import sys
import tempfile
import time
from pathlib import Path

import blosc2
import numpy as np
import pyarrow.parquet as pq

from phileo.schema import DEFAULT_CLEVEL, block_shape, encode_array
from sharding.errors import RowError
from sharding.sources.majortom import BAND_COLUMNS, decode_bands, iter_parquet_rows
from training.data.loader import decode_crop_windows

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tools/ is not installed
from tools.bench_shard import source_files  # noqa: E402
from tools.docs_section import write_docs_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "benchmarks.md"
SECTION = "## Blosc2 block layout (tools/bench_blocks.py)"
MEMBERS = ("s2_10m", "s2_20m", "cloud")  # what the loader decodes
CROP, KS, MB = 128, (1, 4, 16), 1e6
# name -> block side in 10 m pixels (None: Blosc2's choice); 20 m arrays get half the side
LAYOUTS = {"Blosc2 default (row blocks)": None, "all bands, 32 px": 32, "all bands, 64 px (schema)": 64,
           "all bands, 128 px": 128}


def layout_blocks(member: str, shape: tuple[int, ...], side: int | None) -> tuple[int, ...] | None:
    if side is None:
        return None
    if side == 64:
        return block_shape(member, shape)  # the schema's own choice, not a copy of it
    half = side // (2 if member == "s2_20m" else 1)
    return tuple(shape[:-2]) + (min(half, shape[-2]), min(half, shape[-1]))


def load_tiles(input_dir: Path, limit: int) -> list[tuple[dict, int]]:
    """(arrays by member, GeoTIFF bytes of the tile's bands) of the first `limit` good rows."""
    tiles = []
    for file in source_files(input_dir):  # images/*.parquet, *.parquet or one file; never metadata.parquet
        rows = list(range(pq.ParquetFile(file).metadata.num_rows))
        for _, columns in iter_parquet_rows(str(file), rows, False):
            try:
                arrays, _, _ = decode_bands(columns)
            except RowError:
                continue
            tiles.append(({m: arrays[m] for m in MEMBERS if m in arrays},
                          sum(len(columns.get(n) or b"") for n in BAND_COLUMNS)))
            if len(tiles) == limit:
                return tiles
    return tiles


def measure_layout(tiles: list[tuple[dict, int]], side: int | None, seconds: float) -> dict:
    raw = sum(a.nbytes for arrays, _ in tiles for a in arrays.values())
    started = time.perf_counter()
    frames = [{m: encode_array(a, DEFAULT_CLEVEL, layout_blocks(m, a.shape, side)) for m, a in arrays.items()}
              for arrays, _ in tiles]
    encode_s = time.perf_counter() - started
    opened = [{m: blosc2.ndarray_from_cframe(f) for m, f in tile.items()} for tile in frames]
    started = time.perf_counter()
    for tile in opened:
        for array in tile.values():
            array[...]
    decode_s = time.perf_counter() - started
    rng, rates = np.random.default_rng(0), {}
    for k in KS:
        crops, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            for tile in opened:
                height, width = tile["s2_10m"].shape[-2:]
                origins = [(2 * int(rng.integers(0, (height - CROP) // 2 + 1)),
                            2 * int(rng.integers(0, (width - CROP) // 2 + 1))) for _ in range(k)]
                decode_crop_windows(tile, origins, CROP)  # the loader's own call: windows + 20 m halo
                crops += k
        rates[k] = crops / (time.perf_counter() - started)
    return {"bytes": sum(len(f) for tile in frames for f in tile.values()), "encode_mbs": raw / MB / encode_s,
            "decode_mbs": raw / MB / decode_s, "crops_per_s": rates}


def table(results: dict[str, dict], tiff_bytes: int) -> list[str]:
    base = results[next(iter(LAYOUTS))]
    lines = ["| layout | bytes vs GeoTIFF | encode MB/s | whole decode MB/s | "
             + " | ".join(f"crops/s K={k} (vs default)" for k in KS) + " |", "|---" * (4 + len(KS)) + "|"]
    for name, r in results.items():
        crops = " | ".join(f"{r['crops_per_s'][k]:.0f} ({r['crops_per_s'][k] / base['crops_per_s'][k]:.1f}x)"
                           for k in KS)
        lines.append(f"| {name} | {r['bytes'] / tiff_bytes:.3f} | {r['encode_mbs']:.0f} | {r['decode_mbs']:.0f} | "
                     f"{crops} |")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, default=8)
    parser.add_argument("--tile-size", type=int, default=1068)
    parser.add_argument("--input", type=Path, help="MajorTOM-format directory (default: generate tiles)")
    parser.add_argument("--seconds", type=float, default=2.0, help="per crop-decoding measurement")
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args(argv)
    blosc2.set_nthreads(1)
    with tempfile.TemporaryDirectory(prefix="bench_blocks-") as tmp:
        source = args.input
        if source is None:
            from tools.majortom_fixture import make_majortom_dataset

            source = Path(tmp)
            make_majortom_dataset(source, num_files=max(1, args.tiles // 4), rows_per_file=4,
                                  tile_size=args.tile_size, seed=0)
        tiles = load_tiles(source, args.tiles)
    if not tiles:
        raise SystemExit(f"error: no readable MajorTOM rows under {source}")
    tiff = sum(t for _, t in tiles)
    results = {name: measure_layout(tiles, side, args.seconds) for name, side in LAYOUTS.items()}
    lines = table(results, tiff)
    print("\n".join(lines))
    if args.write_docs:
        data = "real rows from " + str(args.input) if args.input else "synthetic fixture tiles (smooth waves + noise)"
        section = "\n".join([
            SECTION, "", f"Command: `python tools/bench_blocks.py {' '.join(sys.argv[1:])}` "
            f"({datetime.date.today().isoformat()}, 2-core machine, 1 Blosc2 thread).", "",
            f"Data: {len(tiles)} tiles of {args.tile_size} px, {data}; ZSTD level {DEFAULT_CLEVEL} + SHUFFLE, arrays "
            "s2_10m, s2_20m and cloud. Crops/s = the loader's block decoding (training/data/windows.py) of K random "
            "128 px crops per tile, ratios against Blosc2's default layout in this run. Whole-array decode is "
            "what `verify`/`inspect` pay.", "", *lines, "",
            "Choice: all-band blocks of 64 px at 10 m (32 px at 20 m) - a 128 px crop touches at most 9 of them. "
            "Synthetic pixels compress differently from real Sentinel-2, so the byte column must be rechecked "
            "on real rows (`--input`); the crop-decoding gain comes from the geometry and transfers.", ""])
        write_docs_section(SECTION, section, DOCS)


if __name__ == "__main__":
    main()
