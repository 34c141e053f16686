"""Sentinel-2 band names, resolutions and the order of every array we store.

This is the one place that knows band order: the shard writer, the reader and the
models all take it from here.
"""

from __future__ import annotations

# Source columns of MajorTOM Core-S2L2A grouped by native resolution, in stored order.
BANDS_10M: tuple[str, ...] = ("B02", "B03", "B04", "B08")
BANDS_20M: tuple[str, ...] = ("B05", "B06", "B07", "B8A", "B11", "B12")
BANDS_60M: tuple[str, ...] = ("B01", "B09")
ALL_BANDS: tuple[str, ...] = BANDS_10M + BANDS_20M + BANDS_60M

# The 10 bands the models consume, in model order (10 m then 20 m), as PhilEO Bench stores them.
MODEL_BANDS: tuple[str, ...] = BANDS_10M + BANDS_20M

CLOUD_MASK = "cloud_mask"

# member name -> (bands, downsampling factor against the 10 m grid)
RESOLUTION_GROUPS: dict[str, tuple[tuple[str, ...], int]] = {
    "s2_10m": (BANDS_10M, 1),
    "s2_20m": (BANDS_20M, 2),
    "s2_60m": (BANDS_60M, 6),
}
STACK_MEMBER = "s2_stack"

# Ground sampling distance in metres of each band group.
GSD_M: dict[str, int] = {"s2_10m": 10, "s2_20m": 20, "s2_60m": 60}

# Digital numbers are reflectance x 10000 (the original divides by this).
REFLECTANCE_SCALE = 10000.0

# MajorTOM Core-S2L2A tiles are 1068 x 1068 pixels at 10 m.
MAJORTOM_TILE_SIZE = 1068


def band_group(band: str) -> tuple[str, int]:
    """Return (member name, channel index) of a source band."""
    for member, (bands, _) in RESOLUTION_GROUPS.items():
        if band in bands:
            return member, bands.index(band)
    raise KeyError(f"unknown Sentinel-2 band {band!r}; expected one of {ALL_BANDS}")
