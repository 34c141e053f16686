"""The shard codec decision: Blosc2 ZSTD-1 + SHUFFLE (phileo/schema.py) vs LZ4 vs the source GeoTIFFs.

On real Sentinel-2 L2A pixels (tools/real_s2_fixture.py: the 120 px patches as they are, and 1068 px
tiles made of them) and on the synthetic fixture (tools/majortom_fixture.py), every tile is decoded
from its DEFLATE GeoTIFFs, then each array member is encoded as the build encodes it (same chunk and
block layout, 1 thread) with each codec. Bytes are compared with the tile's GeoTIFF bytes; speeds are
MB of uncompressed pixels per CPU second (process time, not wall: the machine may be shared).

    python tools/bench_codec.py [--tiles 6] [--write-docs]
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import blosc2
import numpy as np
import rasterio
from rasterio.io import MemoryFile
from rasterio.session import DummySession

from phileo.bands import RESOLUTION_GROUPS
from phileo.schema import CLOUD, DEFAULT_CLEVEL, block_shape, decode_array, encode_array

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tools/ is not installed
from sharding.sources.majortom import BAND_COLUMNS, iter_parquet_rows  # noqa: E402
from tools.docs_section import report  # noqa: E402
from tools.majortom_fixture import FACTOR, _geotiff, make_majortom_dataset  # noqa: E402
from tools.real_s2_fixture import PATCH, make_real_s2_dataset  # noqa: E402

SECTION = "## Shard codec (tools/bench_codec.py)"
MB = 1e6
CORE_S2L2A_TB = 23.0  # Core-S2L2A's size on the Hub: the bytes the shards replace
SPECTRAL = tuple(RESOLUTION_GROUPS)  # s2_10m, s2_20m, s2_60m: the 12 bands without the cloud mask
SCHEMA_CODEC = f"Blosc2 ZSTD-{DEFAULT_CLEVEL} + SHUFFLE (schema)"


def _blosc2(codec: blosc2.Codec, clevel: int) -> Callable[[str, np.ndarray], bytes]:
    cparams = blosc2.CParams(codec=codec, clevel=clevel, filters=[blosc2.Filter.SHUFFLE], nthreads=1)

    def encode(member: str, array: np.ndarray) -> bytes:
        blocks = block_shape(member, array.shape)
        layout = {} if blocks is None else {"chunks": array.shape, "blocks": blocks}
        return blosc2.asarray(array, cparams=cparams, **layout).to_cframe()
    return encode


CODECS: tuple[tuple[str, Callable[[str, np.ndarray], bytes]], ...] = (
    (SCHEMA_CODEC, lambda member, array: encode_array(array, DEFAULT_CLEVEL, block_shape(member, array.shape))),
    ("Blosc2 LZ4-5 + SHUFFLE", _blosc2(blosc2.Codec.LZ4, 5)),
    ("Blosc2 LZ4-9 + SHUFFLE", _blosc2(blosc2.Codec.LZ4, 9)),
    ("Blosc2 LZ4HC-9 + SHUFFLE", _blosc2(blosc2.Codec.LZ4HC, 9)),
    ("Blosc2 ZSTD-3 + SHUFFLE", _blosc2(blosc2.Codec.ZSTD, 3)),
)


def cpu_best(work: Callable[[], object], min_cpu: float = 0.3, rounds: int = 3) -> tuple[float, object]:
    """Least CPU seconds of `rounds` runs of `work` (each run repeated until it took >= min_cpu), its result."""
    best, result = float("inf"), None
    for _ in range(rounds):
        runs, started = 0, time.process_time()
        while True:
            result, runs = work(), runs + 1
            if time.process_time() - started >= min_cpu:
                break
        best = min(best, (time.process_time() - started) / runs)
    return best, result


def read_tiles(root: Path) -> list[dict[str, bytes]]:
    """{band column: GeoTIFF bytes} of every row of the dataset under `root`."""
    import pyarrow.parquet as pq

    tiles = []
    for file in sorted((root / "images").glob("*.parquet")):
        rows = list(range(pq.ParquetFile(file).metadata.num_rows))
        tiles += [{name: columns[name] for name in BAND_COLUMNS}
                  for _, columns in iter_parquet_rows(str(file), rows, False)]
    return tiles


def decode_tiffs(tile: dict[str, bytes]) -> dict[str, np.ndarray]:
    """Every band column decoded with rasterio, as sharding/sources/majortom.py `decode_bands` does."""
    with rasterio.Env(session=DummySession()):
        arrays = {}
        for name, data in tile.items():
            with MemoryFile(data) as memfile, memfile.open() as dataset:
                arrays[name] = dataset.read(1)
        return arrays


def members(bands: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The shard's array members of one tile (s2_10m, s2_20m, s2_60m stacked; cloud)."""
    stacked = {member: np.stack([bands[b] for b in names]) for member, (names, _) in RESOLUTION_GROUPS.items()}
    return stacked | {CLOUD: bands["cloud_mask"]}


def measure(tiles: list[dict[str, bytes]]) -> dict[str, dict]:
    """Per codec: bytes (12 bands, whole tile) and encode/decode MB/s of pixels per CPU second."""
    bands = [decode_tiffs(tile) for tile in tiles]
    arrays = [members(b) for b in bands]
    raw = sum(a.nbytes for tile in arrays for a in tile.values())
    spectral_names = [name for name in BAND_COLUMNS if name != "cloud_mask"]
    tiff_all = sum(len(data) for tile in tiles for data in tile.values())
    tiff_spectral = sum(len(tile[name]) for tile in tiles for name in spectral_names)
    decode_s, _ = cpu_best(lambda: [decode_tiffs(tile) for tile in tiles])
    encode_s, _ = cpu_best(lambda: [_geotiff(a, 32629, 0, 0, 10 * FACTOR[name])
                                    for tile in bands for name, a in tile.items()])
    results = {"GeoTIFF DEFLATE + predictor 2 (source)": {
        "spectral": tiff_spectral, "all": tiff_all, "enc": raw / MB / encode_s, "dec": raw / MB / decode_s}}
    for name, encode in CODECS:
        encode_s, frames = cpu_best(lambda encode=encode: [{m: encode(m, a) for m, a in tile.items()}
                                                           for tile in arrays])
        decode_s, _ = cpu_best(lambda frames=frames: [decode_array(f) for tile in frames for f in tile.values()])
        results[name] = {"spectral": sum(len(t[m]) for t in frames for m in SPECTRAL),
                         "all": sum(len(f) for t in frames for f in t.values()),
                         "enc": raw / MB / encode_s, "dec": raw / MB / decode_s}
    for row in results.values():
        row["vs_spectral"], row["vs_all"] = row["spectral"] / tiff_spectral, row["all"] / tiff_all
    return {"tiles": len(tiles), "tiff_mb": tiff_all / len(tiles) / MB, "codecs": results}


def datasets(work: Path, tiles: int) -> list[tuple[str, Path]]:
    """(description, dataset dir) of every source measured."""
    native = make_real_s2_dataset(work / "real-120", rows_per_file=3 * 8)  # 3 patches x 8 flips
    out = [(f"real L2A, the {PATCH} px patches as they are ({len(native)} tiles: 3 patches x 8 flips)",
            work / "real-120")]
    for fill in ("mosaic", "mirror"):
        make_real_s2_dataset(work / f"real-{fill}", rows_per_file=tiles, tile_size=1068, fill=fill)
        out.append((f"real L2A, 1068 px `{fill}` tiles of the patches", work / f"real-{fill}"))
    make_majortom_dataset(work / "synthetic", num_files=1, rows_per_file=tiles, tile_size=1068)
    return out + [("synthetic 1068 px tiles (tools/majortom_fixture.py)", work / "synthetic")]


def table(results: list[tuple[str, dict]]) -> list[str]:
    lines = ["| pixels | GeoTIFF MB/tile | codec | bytes vs GeoTIFF, 12 bands | bytes vs GeoTIFF, tile "
             "| encode MB/s per CPU s | decode MB/s per CPU s |", "|---|---|---|---|---|---|---|"]
    for source, result in results:
        for codec, row in result["codecs"].items():
            bold = "**" if codec == SCHEMA_CODEC else ""
            lines.append(f"| {source} | {result['tiff_mb']:.2f} | {codec} | {bold}{row['vs_spectral']:.3f}{bold} | "
                         f"{row['vs_all']:.3f} | {row['enc']:.0f} | {row['dec']:.0f} |")
    return lines


def decision(results: list[tuple[str, dict]]) -> list[str]:
    """The decision, in numbers of the real 1068 px mosaic (real pixels at MajorTOM's tile size)."""
    real = next(result for source, result in results if "mosaic" in source)["codecs"]
    zstd, lz4 = real[SCHEMA_CODEC], real["Blosc2 LZ4-5 + SHUFFLE"]
    tiff_dec = real["GeoTIFF DEFLATE + predictor 2 (source)"]["dec"]
    best_name, best_lz4 = min(((name, row) for name, row in real.items() if "LZ4" in name),
                              key=lambda item: item[1]["vs_spectral"])
    return [f"On the real pixels at MajorTOM's tile size (the mosaic rows), ZSTD-{DEFAULT_CLEVEL} + SHUFFLE stores "
            f"**{zstd['vs_spectral']:.3f}x** the GeoTIFF bytes of the 12 bands, LZ4 {lz4['vs_spectral']:.3f}x "
            f"(the smallest LZ4 variant, {best_name.split()[1]}, {best_lz4['vs_spectral']:.3f}x, encodes at "
            f"{best_lz4['enc']:.0f} MB/s). Over Core-S2L2A's ~{CORE_S2L2A_TB:.0f} TB of "
            f"GeoTIFFs that is {CORE_S2L2A_TB * zstd['vs_spectral']:.1f} TB of shards against "
            f"{CORE_S2L2A_TB * lz4['vs_spectral']:.1f} TB with LZ4: "
            f"**{CORE_S2L2A_TB * (lz4['vs_spectral'] - zstd['vs_spectral']):.1f} TB less** to keep and to read "
            f"every epoch. ZSTD-1 decodes at {zstd['dec']:.0f} MB/s of pixels per core against LZ4's "
            f"{lz4['dec']:.0f} MB/s, but a loader reads every stored byte each epoch and decodes only the blocks "
            "under its crops (docs/benchmarks.md, Data loader), so the bytes weigh more than this decode speed. "
            f"Encoding at {zstd['enc']:.0f} MB/s costs {tiff_dec / zstd['enc']:.2f}x the CPU of the GeoTIFF decode "
            f"the build does anyway ({tiff_dec:.0f} MB/s). **ZSTD-1 + SHUFFLE stays.**",
            "", "What the made-up tiles do to these figures: the native 120 px patches carry per-file overhead "
            "(GeoTIFF header and tags, Blosc2 frame metadata) that is negligible at 1068 px; `mosaic` tiles "
            "add an edge every 120 px; `mirror` tiles repeat the same pixels every 240 px, which DEFLATE's "
            "strips (1068 px rows) find and Blosc2's 64 px blocks cannot: the GeoTIFFs shrink several-fold "
            "and the ratio is meaningless for real data. The synthetic fixture's smooth fields and Gaussian noise "
            "happen to land near the real ratio for ZSTD."]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, default=4, help="1068 px tiles per made-up source")
    parser.add_argument("--write-docs", action="store_true", help="write the section into docs/benchmarks.md")
    args = parser.parse_args(argv)
    if args.tiles < 1:
        raise SystemExit("error: --tiles must be >= 1")
    load_before = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    threads = blosc2.nthreads
    blosc2.set_nthreads(1)  # decode with one thread, as encode: MB/s per core
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_codec-") as tmp:
        for source, root in datasets(Path(tmp), args.tiles):
            results.append((source, measure(read_tiles(root))))
            print(f"measured: {source}", flush=True)
    blosc2.set_nthreads(threads)
    load_after = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    lines = [SECTION, "", f"Command: `python tools/bench_codec.py {' '.join(sys.argv[1:] if argv is None else argv)}`",
             "", f"Machine: nproc {len(os.sched_getaffinity(0))}, shared; load average before / after "
             f"{load_before} / {load_after}. Python {sys.version.split()[0]}, blosc2 {blosc2.__version__}, "
             f"GDAL {rasterio.__gdal_version__}. Date: {datetime.date.today().isoformat()}.", "",
             "Every tile is decoded from its DEFLATE GeoTIFFs, then each array member is encoded as the build "
             "encodes it (phileo/schema.py chunk and block layout, 1 thread) with each codec and decoded back. "
             "Bytes: all members against the tile's GeoTIFF columns (the 12 bands alone, and with the "
             "cloud mask: the real pixels' mask is all clear, see tests/data/README.md). Speeds: MB of "
             "uncompressed pixels per CPU second (process time, best of 3; the machine is shared, so wall time "
             "is not used). Real pixels: tools/real_s2_fixture.py (3 BigEarthNet L2A patches).", "",
             *table(results), "", *decision(results)]
    report(SECTION, lines, args.write_docs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
