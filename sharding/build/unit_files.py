"""A work unit's index rows and band histogram: written by every unit, assembled by `finalize`.

One format for the MajorTOM-family and the PhilEO Bench builds. The histogram of sampled DNs
per band is stored sparse (band rows, DN values, counts): a unit fills some thousands of its
12 x 65536 bins (compressed: a few kB). `add_histogram` also reads the dense `histogram` array
that units of earlier builds wrote, so those builds still resume and finalize.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from phileo.bands import ALL_BANDS
from sharding.build.writer import atomic_write
from sharding.layout import unit_file

HISTOGRAM_SHAPE = (len(ALL_BANDS), 65536)  # bands x uint16 DNs


def index_schema() -> pa.Schema:
    """The index.parquet columns of every dataset (PhilEO Bench adds its own after these)."""
    return pa.schema([("key", pa.string()), ("shard", pa.string()), ("offset", pa.int64()),
                      ("bytes", pa.int64()), ("grid_cell", pa.string()), ("centre_lat", pa.float64()),
                      ("centre_lon", pa.float64()), ("timestamp", pa.string()), ("cloud_cover", pa.float64()),
                      ("nodata", pa.float64()), ("product_id", pa.string())])


def new_histogram() -> np.ndarray:
    return np.zeros(HISTOGRAM_SHAPE, dtype=np.int64)


def write_unit_files(output: Path, unit: int, index: list[dict], schema: pa.Schema, histogram: np.ndarray) -> None:
    """`units/UUUUUU.index.parquet` then `units/UUUUUU.hist.npz`, each atomically."""
    table = pa.Table.from_pylist(index, schema=schema)
    atomic_write(output / unit_file(unit, "index.parquet"), lambda path: pq.write_table(table, path))
    rows, values = np.nonzero(histogram)

    def save_histogram(path: Path) -> None:  # compressed: tens of thousands of bins for a unit of real tiles
        with open(path, "wb") as file:
            np.savez_compressed(file, rows=rows.astype(np.uint8), values=values.astype(np.uint16),
                                counts=histogram[rows, values])

    atomic_write(output / unit_file(unit, "hist.npz"), save_histogram)


def add_histogram(into: np.ndarray, path: Path) -> None:
    """Add a unit's histogram file to the dense (bands, 65536) `into`, in place (no 6 MB array per unit)."""
    with np.load(path) as saved:
        if "histogram" in saved:  # dense, as units of earlier builds wrote it
            into += saved["histogram"]
        else:  # (band, DN) pairs are unique within a file, so fancy-index += adds each once
            into[saved["rows"], saved["values"]] += saved["counts"]

