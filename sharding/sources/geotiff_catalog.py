"""`--source geotiff`: a directory of per-sample folders of single-band GeoTIFFs.

This is how extracted subsets are often shared: one folder per sample holding B01.tif ...
B12.tif, cloud_mask.tif and optionally metadata.json ({"grid_cell", "product_id",
"product_datetime" (YYYYMMDDTHHMMSS) or "timestamp" (ISO), "cloud_cover", "nodata"}). Folders
are read like MajorTOM's extracted layout (sharding/sources/majortom.py); without metadata the
key is the folder name and the footprint comes from B02.tif's header (no pixels are read).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from phileo.geo import corners_lonlat_from_transform
from sharding.errors import InputError
from sharding.sources.majortom_catalog import Catalog, make_row, reject

SOURCE = "geotiff"
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_\-]")


def folder_key(folder: Path) -> str:
    """The folder name as a shard key: keys hold only letters, digits, '_' and '-' (never dots)."""
    return _KEY_UNSAFE.sub("-", folder.name)


def _read_metadata(folder: Path) -> dict:
    path = folder / "metadata.json"
    if not path.is_file():
        return {}
    try:
        metadata = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"metadata.json is not readable JSON ({error})") from error
    if not isinstance(metadata, dict):
        raise ValueError("metadata.json is not a JSON object")
    return metadata


def _footprint(b02: Path) -> tuple[float, float]:
    """(centre_lat, centre_lon) from the GeoTIFF header."""
    import rasterio

    with rasterio.open(b02) as dataset:
        if dataset.crs is None:
            raise ValueError("B02.tif has no CRS")
        corners = corners_lonlat_from_transform(dataset.crs.to_string(), tuple(dataset.transform)[:6],
                                                (dataset.height, dataset.width))
    return corners["centre_lat"], corners["centre_lon"]


def geotiff_row(folder: Path, root: Path) -> dict:
    """One plan row for a sample folder; ValueError names what is wrong with it."""
    metadata = _read_metadata(folder)
    est_bytes = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
    if "grid_cell" in metadata and "product_datetime" in metadata:
        row = make_row(str(folder), str(root), 0, metadata.get("product_id", folder.name), metadata["grid_cell"],
                       metadata["product_datetime"], est_bytes)
    else:
        centre_lat, centre_lon = _footprint(folder / "B02.tif")
        row = {"source_file": str(folder), "source_group": str(root), "source_row": 0, "key": folder_key(folder),
               "product_id": metadata.get("product_id", folder.name), "grid_cell": metadata.get("grid_cell", ""),
               "timestamp": metadata.get("timestamp", ""), "cloud_cover": math.nan, "nodata": math.nan,
               "centre_lat": centre_lat, "centre_lon": centre_lon, "est_bytes": est_bytes}
    for name in ("cloud_cover", "nodata"):
        if metadata.get(name) is not None:
            row[name] = float(metadata[name])
    return row | {"source": SOURCE}


def list_geotiff_folders(input_path: str) -> Catalog:
    """Every folder under `input_path` holding a B02.tif, in path order."""
    root = Path(input_path)
    if not root.is_dir():
        raise InputError(f"--input {input_path}: --source geotiff expects a directory of sample folders")
    catalog, rows = Catalog(layout="extracted", tile_bytes="file sizes"), []
    for b02 in sorted(root.rglob("B02.tif")):
        try:
            rows.append(geotiff_row(b02.parent, root))
        except (ValueError, OSError) as error:
            catalog.rejected.append(reject(b02.parent, 0, str(error)))
    catalog.add_rows(rows)
    if not len(catalog) and not catalog.rejected:
        raise InputError(f"--input {input_path}: no sample folders with a B02.tif found")
    return catalog
