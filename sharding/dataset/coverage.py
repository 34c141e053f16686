"""`phileo-shard coverage`: where and when a dataset's samples are, from its index.parquet alone.

One PNG: a world map (-180..180, -90..90) of samples per 1-degree cell with a 30-degree
graticule (and the sample centres themselves for small datasets), counts per 10-degree
latitude band, acquisition months and cloud cover. Next to it, `<name>.json` holds the same
counts. No basemap or network access.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.compute as pc

from sharding.build.writer import CLOUD_HISTOGRAM_BINS, atomic_write
from sharding.dataset.location import DatasetLocation, load_manifest
from sharding.errors import InputError
from sharding.layout import INDEX

log = logging.getLogger(__name__)

BAND_DEGREES = 10
SCATTER_AT_MOST = 5000
MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def band_name(south: int) -> str:
    return f"{south}..{south + BAND_DEGREES}"


def latitude_band_counts(lat: np.ndarray) -> dict[str, int]:
    """Samples per 10-degree band, south to north; a band holds its southern edge (90 goes to 80..90)."""
    edges = np.arange(-90, 91, BAND_DEGREES)
    counts, _ = np.histogram(np.clip(lat, -90, 90), bins=edges)  # numpy's last bin is closed: 90 counts
    return {band_name(int(south)): int(count) for south, count in zip(edges[:-1], counts)}


@dataclass
class Coverage:
    """The counts written to the JSON next to the map."""

    samples: int
    lat_bands: dict[str, int]
    months: dict[str, int]
    cloud_cover_histogram: list[int]
    one_degree_cells: int
    lat_range: list[float]
    lon_range: list[float]

    def line(self, png: Path, json_path: Path) -> str:
        busiest = max(self.lat_bands, key=self.lat_bands.get)
        return (f"{self.samples} samples in {self.one_degree_cells} 1-degree cells, lat {self.lat_range[0]:.1f}.."
                f"{self.lat_range[1]:.1f}, lon {self.lon_range[0]:.1f}..{self.lon_range[1]:.1f}, busiest band "
                f"{busiest} ({self.lat_bands[busiest]}): map {png}, counts {json_path}")


def read_columns(dataset: DatasetLocation) -> dict[str, np.ndarray]:
    """The index columns the map needs (a remote index: only their column chunks are fetched)."""
    load_manifest(dataset)  # a finished dataset, or a one-line error
    index = dataset.parquet(INDEX)
    if index is None:
        raise InputError(f"{dataset}: no {INDEX}")
    table = index.read(columns=["centre_lat", "centre_lon", "timestamp", "cloud_cover"])
    located = table.filter(pc.and_(pc.is_valid(table.column("centre_lat")), pc.is_valid(table.column("centre_lon"))))
    if located.num_rows == 0:
        raise InputError(f"{dataset}: no sample with a location in {INDEX}; nothing to map")
    if located.num_rows < table.num_rows:
        log.warning("%d samples without centre_lat/centre_lon are left out", table.num_rows - located.num_rows)
    months = pc.utf8_slice_codeunits(located.column("timestamp"), 5, 7)
    return {"lat": located.column("centre_lat").to_numpy(zero_copy_only=False),
            "lon": located.column("centre_lon").to_numpy(zero_copy_only=False),
            "month": np.array([int(m) if m else 0 for m in months.to_pylist()], dtype=np.int64),
            "cloud": pc.drop_null(located.column("cloud_cover")).to_numpy()}


def count(columns: dict[str, np.ndarray]) -> Coverage:
    lat, lon = columns["lat"], columns["lon"]
    month_counts = np.bincount(columns["month"], minlength=13)
    cloud = np.clip((columns["cloud"] // 10).astype(np.int64), 0, CLOUD_HISTOGRAM_BINS - 1)
    cells = {(math.floor(a), math.floor(o)) for a, o in zip(lat.tolist(), lon.tolist())}
    months = {name: int(n) for name, n in zip(MONTHS, month_counts[1:])}
    if month_counts[0]:
        months["unknown"] = int(month_counts[0])
    return Coverage(len(lat), latitude_band_counts(lat), months,
                    np.bincount(cloud, minlength=CLOUD_HISTOGRAM_BINS).tolist(), len(cells),
                    [float(lat.min()), float(lat.max())], [float(lon.min()), float(lon.max())])


def draw(columns: dict[str, np.ndarray], coverage: Coverage, title: str, path: Path) -> None:
    """Map, latitude bands, months and cloud cover in one PNG (Agg canvas, no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure

    figure = Figure(figsize=(15, 10), layout="constrained")
    FigureCanvasAgg(figure)
    grid = figure.add_gridspec(2, 3, height_ratios=[2, 1])
    world = figure.add_subplot(grid[0, :])
    density, _, _ = np.histogram2d(columns["lon"], columns["lat"], bins=[360, 180], range=[[-180, 180], [-90, 90]])
    image = world.imshow(np.ma.masked_equal(density.T, 0), origin="lower", extent=(-180, 180, -90, 90),
                         norm=LogNorm(vmin=1, vmax=max(density.max(), 2)), cmap="viridis", interpolation="nearest")
    if coverage.samples <= SCATTER_AT_MOST:
        world.scatter(columns["lon"], columns["lat"], s=6, c="crimson", linewidths=0, label="sample centres")
        world.legend(loc="lower left")
    figure.colorbar(image, ax=world, label="samples per 1° cell", shrink=0.8)
    world.set(xlim=(-180, 180), ylim=(-90, 90), xticks=range(-180, 181, 30), yticks=range(-90, 91, 30),
              xlabel="longitude", ylabel="latitude", aspect="equal", facecolor="#eef2f6")
    world.grid(True, color="grey", linewidth=0.4, alpha=0.6)
    world.set_title(f"{title}: {coverage.samples} samples in {coverage.one_degree_cells} 1° cells")
    bands = figure.add_subplot(grid[1, 0])
    bands.barh(np.arange(-90, 90, BAND_DEGREES) + BAND_DEGREES / 2, list(coverage.lat_bands.values()),
               height=BAND_DEGREES * 0.9)
    bands.set(ylim=(-90, 90), yticks=range(-90, 91, 30), xlabel="samples", ylabel="latitude",
              title="per 10° latitude band")
    months = figure.add_subplot(grid[1, 1])
    positions = np.arange(len(coverage.months))  # numbers, not the names: matplotlib would parse them as dates
    months.bar(positions, list(coverage.months.values()))
    months.set_xticks(positions, list(coverage.months), rotation=60)
    months.set(ylabel="samples", title="acquisition month")
    cloud = figure.add_subplot(grid[1, 2])
    cloud.bar(np.arange(CLOUD_HISTOGRAM_BINS) * 10 + 5, coverage.cloud_cover_histogram, width=9)
    cloud.set(xlim=(0, 100), xlabel="cloud cover (%)", ylabel="samples", title="cloud cover")
    atomic_write(path, lambda p: figure.savefig(p, format="png", dpi=80))


def coverage_map(dataset: str, out: str) -> tuple[Coverage, Path, Path]:
    """Write the PNG at `out` and `<out stem>.json` next to it; returns (counts, png path, json path)."""
    root, png = DatasetLocation(dataset), Path(out)
    if png.suffix.lower() != ".png":
        raise InputError(f"--output {out}: expected a .png file name")
    if png.is_dir():
        raise InputError(f"--output {out}: is a directory")
    columns = read_columns(root)
    coverage = count(columns)
    png.parent.mkdir(parents=True, exist_ok=True)
    draw(columns, coverage, root.name, png)
    json_path = png.with_suffix(".json")
    atomic_write(json_path, lambda p: p.write_text(json.dumps(
        {"dataset": str(root) if root.remote else str(Path(root.root).resolve()), **coverage.__dict__}, indent=1)))
    return coverage, png, json_path
