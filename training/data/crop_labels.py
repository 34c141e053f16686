"""Per-crop pretraining labels, computed from the sample alone (no GDAL, no global rasters).

Each label comes with a per-crop weight: 0 where the layer is missing or all no-data, so
the loss ignores it; partly covered crops are weighted by their valid fraction (water and
buildings use 255 as no-data, land cover 0, as sharding/build/labels.py writes them).
Cloud classes are the raw mask values 0..3 (the original divided the mask by 10000 first,
so only class 0 could ever match: fixed here; ESA-PhiLab/PhilEO-MajorTOM data/majortom.py:117-118).
"""

from __future__ import annotations

import math

import numpy as np

NUM_CLOUD_CLASSES = 4
# ESA WorldCover codes -> classes 1..11 (0 = no data), as the original's landcover label.
WORLDCOVER_CODES = (10, 20, 30, 40, 50, 60, 70, 80, 90, 95, 100)
NUM_LANDCOVER_CLASSES = len(WORLDCOVER_CODES)
_WORLDCOVER_LUT = np.zeros(256, dtype=np.int64)
_WORLDCOVER_LUT[list(WORLDCOVER_CODES)] = np.arange(1, NUM_LANDCOVER_CLASSES + 1)


def crop_coords(corners_lonlat: list, shape: tuple[int, int], y: int, x: int, size: int) -> np.ndarray:
    """sin/cos lat/lon code (4,) of the crop centre, from the tile corners.

    Scalar math: the same formulas as phileo.geo.pixel_lonlat + encode_latlon (float64), without
    their array overhead, which cost a quarter of the per-crop label time.
    """
    (ul_lon, ul_lat), (ur_lon, ur_lat), (lr_lon, lr_lat), (ll_lon, ll_lat) = corners_lonlat
    u, v = (x + size / 2) / shape[1], (y + size / 2) / shape[0]
    lon = (ul_lon * (1 - u) + ur_lon * u) * (1 - v) + (ll_lon * (1 - u) + lr_lon * u) * v
    lat = (ul_lat * (1 - u) + ur_lat * u) * (1 - v) + (ll_lat * (1 - u) + lr_lat * u) * v
    lat_angle, lon_angle = 2 * math.pi * (lat + 90) / 180, 2 * math.pi * (lon + 180) / 360
    parts = (math.sin(lat_angle), math.cos(lat_angle), math.sin(lon_angle), math.cos(lon_angle))
    return np.array([(part + 1) / 2 for part in parts], dtype=np.float32)


def cloud_fractions(cloud: np.ndarray) -> np.ndarray:
    """Fraction of pixels in each cloud class 0..3 (values above 3 count as class 3)."""
    counts = np.bincount(cloud.reshape(-1), minlength=NUM_CLOUD_CLASSES)
    if len(counts) > NUM_CLOUD_CLASSES:  # rare codes above 3: fold them into class 3
        counts = np.concatenate([counts[: NUM_CLOUD_CLASSES - 1], [counts[NUM_CLOUD_CLASSES - 1 :].sum()]])
    return (counts / cloud.size).astype(np.float32)


def landcover_fractions(codes: np.ndarray) -> tuple[np.ndarray, float]:
    """(11 class fractions over labelled pixels, weight = labelled fraction); no data -> ([1,0..], 0)."""
    classes = _WORLDCOVER_LUT[np.clip(codes.ravel(), 0, 255)]
    counts = np.bincount(classes, minlength=NUM_LANDCOVER_CLASSES + 1)[1:]
    labelled = int(counts.sum())
    if labelled == 0:
        empty = np.zeros(NUM_LANDCOVER_CLASSES, dtype=np.float32)
        empty[0] = 1.0
        return empty, 0.0
    return (counts / labelled).astype(np.float32), labelled / codes.size


_NO_CLOUD = np.eye(NUM_CLOUD_CLASSES, dtype=np.float32)[0]  # placeholders of weight 0 for missing layers
_NO_LANDCOVER = landcover_fractions(np.zeros(1, np.uint8))[0]


def crop_labels(meta: dict, arrays: dict[str, np.ndarray], y: int, x: int, size: int) -> dict[str, np.ndarray]:
    """All labels + weights of the crop at (y, x) of a decoded tile."""
    window = (slice(y, y + size), slice(x, x + size))
    shape = tuple(meta["shape"])
    labels = {"coords": crop_coords(meta["corners_lonlat"], shape, y, x, size), "coords_weight": 1.0}
    if "cloud" in arrays:
        labels |= {"clouds": cloud_fractions(arrays["cloud"][window]), "clouds_weight": 1.0}
    else:
        labels |= {"clouds": _NO_CLOUD.copy(), "clouds_weight": 0.0}
    if "label_landcover" in arrays:
        fractions, weight = landcover_fractions(arrays["label_landcover"][window])
        labels |= {"landcover": fractions, "landcover_weight": weight}
    else:
        labels |= {"landcover": _NO_LANDCOVER.copy(), "landcover_weight": 0.0}
    for name, scale in (("buildings", 100.0), ("water", 1.0)):
        layer = arrays.get(f"label_{name}")
        value, weight = 0.0, 0.0
        if layer is not None:
            value, weight = valid_mean(layer[window], meta.get("labels", {}).get(name, {}).get("nodata", 255))
        labels |= {name: np.array([value / scale], dtype=np.float32), f"{name}_weight": weight}
    return labels


def valid_mean(values: np.ndarray, nodata: float | None) -> tuple[float, float]:
    """(mean over valid pixels, valid fraction as the weight); nodata None means NaN marks no data."""
    valid = ~np.isnan(values) if nodata is None else values != nodata
    count = int(np.count_nonzero(valid))
    if count == 0:
        return 0.0, 0.0
    return float(values[valid].mean()), count / values.size
