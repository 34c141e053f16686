"""Benchmark `phileo-shard build` with and without 3 co-registered label rasters (--label).

Writes a MajorTOM-format fixture of real-size tiles (default 24 x 1068 px, tools/majortom_fixture.py)
and global label VRTs covering its cells (tools/label_fixture.py: landcover and water at
WorldCover's 1/12000 degree, buildings at 1/1200 degree, tiled deflate GeoTIFFs), then runs the
in-process build alternately without and with `--label landcover/water/buildings`, best of
--repeat each, and reports tiles/s and their ratio (target >= 0.70), plus the cost of each
layer per tile measured on its own (window read + reproject + encode).

    python tools/bench_labels.py [--tiles 24] [--tile-size 1068] [--repeat 3] [--workers 1] [--source fasttom]
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from phileo.schema import decode_sample  # noqa: E402
from sharding.build.driver import BuildArgs, build  # noqa: E402
from sharding.build.fasttom import FastTomRules  # noqa: E402
from sharding.build.labels import LabelRaster, add_labels, parse_label_spec  # noqa: E402
from sharding.build.plan import Filters  # noqa: E402
from sharding.dataset.tarread import iter_tar_samples  # noqa: E402
from tools.label_fixture import make_label_rasters  # noqa: E402
from tools.majortom_fixture import make_majortom_dataset  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, default=24, help="fixture tiles")
    parser.add_argument("--files", type=int, default=3, help="fixture parquet files")
    parser.add_argument("--tile-size", type=int, default=1068, help="10 m pixels per tile side")
    parser.add_argument("--res", type=float, default=1 / 12000, help="landcover/water pixel size (degrees)")
    parser.add_argument("--buildings-res", type=float, default=1 / 1200, help="buildings pixel size (degrees)")
    parser.add_argument("--repeat", type=int, default=3, help="builds of each kind (best kept)")
    parser.add_argument("--workers", type=int, default=1, help="build worker processes")
    parser.add_argument("--source", choices=("majortom", "fasttom"), default="majortom",
                        help="fasttom: one 516 px quadrant per tile, every tile kept (--min-clear 0 --max-water 1)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    return parser.parse_args(argv)


def make_inputs(root: Path, args: argparse.Namespace) -> tuple[Path, dict[str, Path]]:
    started = time.perf_counter()
    rows = max(1, args.tiles // args.files)
    records = make_majortom_dataset(root / "src", num_files=args.files, rows_per_file=rows,
                                    tile_size=args.tile_size)
    cells = sorted({record["grid_cell"] for record in records})
    rasters = make_label_rasters(root / "labels", cells, pad_cells=1, res_deg=args.res,
                                 buildings_res_deg=args.buildings_res)
    print(f"fixture: {len(records)} tiles of {args.tile_size} px, label rasters for {len(cells)} cells, "
          f"{time.perf_counter() - started:.1f} s", flush=True)
    return root / "src", rasters


def timed_build(source: Path, output: Path, labels: tuple, workers: int,
                fasttom: FastTomRules | None = None) -> tuple[float, float, int]:
    """(wall s as build() reports it, CPU s of this process and its children, tiles written)."""
    args = BuildArgs(str(source), str(output), Filters(), labels=labels, fasttom=fasttom)
    cpu = cpu_seconds()
    summary = build(args, workers=workers, overwrite=True)
    cpu = cpu_seconds() - cpu
    if summary.failed_units or not summary.written:
        raise SystemExit(f"error: build failed: {summary.failed_units[:1]}")
    return summary.seconds, cpu, summary.written


def cpu_seconds() -> float:
    """user + sys of this process and its reaped children: robust to other load on the machine."""
    return sum(sum(resource.getrusage(who)[:2]) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))


def per_layer_cost(output: Path, labels: tuple) -> dict[str, float]:
    """CPU ms per tile of each layer alone, on the built samples in build order (cache as in a unit)."""
    samples = [decode_sample(raw.key, raw.members, validate=False)
               for shard in sorted((output / "shards").glob("*.tar")) for raw in iter_tar_samples(shard)]
    costs = {}
    for spec in labels:
        raster = LabelRaster(spec)
        started = time.process_time()
        for sample in samples:
            add_labels(sample, [raster])
        costs[spec.name] = (time.process_time() - started) * 1e3 / len(samples)
        hits, misses = raster.cache.hits, raster.cache.misses
        raster.close()
        print(f"  {spec.name} ({spec.resampling}): {costs[spec.name]:.1f} CPU ms/tile, "
              f"block cache hit rate {hits / max(hits + misses, 1):.0%}", flush=True)
    return costs


def report(args: argparse.Namespace, tiles: int, best: dict, labels: tuple, costs: dict[str, float]) -> None:
    """Markdown tables of the best runs."""
    print(f"\nMachine: {platform.machine()}, nproc {os.cpu_count()}, load {os.getloadavg()[0]:.2f}; "
          f"Python {platform.python_version()}; {tiles} tiles of {args.tile_size} px, --source {args.source}, "
          f"--workers {args.workers}, "
          f"best of {args.repeat}; landcover/water {args.res:.6g} deg, buildings {args.buildings_res:.6g} deg\n")
    names = ", ".join(f"{spec.name}:{spec.resampling}" for spec in labels)
    print("| build | tiles/s (wall) | tiles per CPU s |\n|---|---|---|")
    for kind, title in (("without", "no labels"), ("with", f"3 labels ({names})")):
        print(f"| {title} | {tiles / best[kind]['wall']:.2f} | {tiles / best[kind]['cpu']:.2f} |")
    print(f"| **ratio with / without** | **{best['without']['wall'] / best['with']['wall']:.2f}** | "
          f"**{best['without']['cpu'] / best['with']['cpu']:.2f}** |")
    print("\n| cost per tile | CPU ms |\n|---|---|")
    for name, cost in costs.items():
        print(f"| label {name} (window read + reproject + encode) | {cost:.1f} |")
    print(f"| whole build without labels | {1e3 * best['without']['cpu'] / tiles:.1f} |")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="bench_labels_"))
    try:
        source, rasters = make_inputs(root, args)
        labels = tuple(parse_label_spec(f"{name}={path}") for name, path in rasters.items())
        best = {kind: {"wall": float("inf"), "cpu": float("inf")} for kind in ("without", "with")}
        tiles = 0
        fasttom = FastTomRules(min_clear=0.0, max_water=1.0) if args.source == "fasttom" else None
        for attempt in range(args.repeat):  # alternate, so load changes hit both kinds alike
            for kind, specs in (("without", ()), ("with", labels)):
                wall, cpu, tiles = timed_build(source, root / f"out_{kind}", specs, args.workers, fasttom)
                best[kind] = {"wall": min(best[kind]["wall"], wall), "cpu": min(best[kind]["cpu"], cpu)}
                print(f"run {attempt + 1} {kind} labels: {tiles / wall:.2f} tiles/s wall, "
                      f"{tiles / cpu:.2f} tiles per CPU s", flush=True)
        print("per-layer cost, one layer at a time on the built tiles:")
        costs = per_layer_cost(root / "out_with", labels)
        report(args, tiles, best, labels, costs)
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
