"""FastTOM: the paper's land-only subset of MajorTOM, made from MajorTOM rows in one pass.

Rules of its creation procedure, as the PhilEO-MajorTOM paper describes it: of each tile's four fixed 516 x 516
quadrants (10 m) keep the one with the largest clear-sky fraction (cloud_mask == 0), drop the
tile when that fraction is below `min_clear` (0.33), drop it when the quadrant's water fraction
(from the co-registered `water` label) exceeds `max_water` (0.5). The quadrants sit in the
corners: offsets 0 and H - 516 = 552 are multiples of 6, so the 20 m and 60 m grids stay aligned.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from phileo.bands import RESOLUTION_GROUPS
from phileo.geo import corners_lonlat_from_transform
from phileo.schema import CLOUD, LABEL_PREFIX, Sample
from sharding.errors import InputError
from sharding.sources.majortom import cloud_cover_percent, nodata_fraction

QUADRANT_SIZE = 516
WATER_LABEL = "water"
WATER = 1  # label_water: 0 land, 1 water, 255 no data


@dataclass(frozen=True)
class FastTomRules:
    min_clear: float = 0.33
    max_water: float = 0.5
    quadrant_size: int = QUADRANT_SIZE

    def __post_init__(self) -> None:
        if not 0 <= self.min_clear <= 1:
            raise InputError(f"--min-clear {self.min_clear}: expected a fraction in 0..1")
        if not 0 <= self.max_water <= 1:
            raise InputError(f"--max-water {self.max_water}: expected a fraction in 0..1")
        if self.quadrant_size <= 0 or self.quadrant_size % 6:
            raise InputError(f"quadrant size {self.quadrant_size}: expected a positive multiple of 6")


def quadrant_offsets(height: int, width: int, size: int) -> list[tuple[int, int]]:
    """(y, x) of the four corner quadrants in row-major order: UL, UR, LL, LR."""
    bottom, right = height - size, width - size
    return [(0, 0), (0, right), (bottom, 0), (bottom, right)]


def clear_fraction(cloud: np.ndarray) -> float:
    return float(np.count_nonzero(cloud == 0) / cloud.size)


def water_fraction(water: np.ndarray) -> float | None:
    """Share of water among the pixels the raster covers; None when it covers none."""
    covered = np.count_nonzero(water != 255)
    return float(np.count_nonzero(water == WATER) / covered) if covered else None


def fasttom_quadrant(sample: Sample, rules: FastTomRules,
                     add_labels: Callable[[Sample], None] | None = None) -> Sample | str:
    """The tile's FastTOM sample, or the reason it is dropped.

    `add_labels` (the build's co-registration of its label rasters) runs on the kept quadrant
    alone, before the water rule reads its `water` layer: a quarter of the tile's pixels (2.2x
    less label CPU per tile than co-registering the whole tile and cropping; docs/benchmarks.md).
    """
    height, width = sample.meta["shape"]
    size = rules.quadrant_size
    if height < size or width < size or height % 6 or width % 6:
        return f"tile {height}x{width} cannot hold {size}x{size} quadrants on the 60 m grid"
    offsets = quadrant_offsets(height, width, size)
    clear = [clear_fraction(sample.arrays[CLOUD][y : y + size, x : x + size]) for y, x in offsets]
    best = int(np.argmax(clear))  # first of equals: deterministic
    if clear[best] < rules.min_clear:
        return f"clear fraction {clear[best]:.3f} of the best quadrant < --min-clear {rules.min_clear}"
    quadrant = crop_sample(sample, *offsets[best], size)
    if add_labels is not None:
        add_labels(quadrant)
    water_member = LABEL_PREFIX + WATER_LABEL
    water = water_fraction(quadrant.arrays[water_member]) if water_member in quadrant.arrays else None
    if water is not None and water > rules.max_water:
        return f"water fraction {water:.3f} > --max-water {rules.max_water}"
    quadrant.meta.update(source="fasttom", key=f"{sample.key}_q{best}", quadrant=best, clear_fraction=clear[best],
                         water_fraction=water, majortom_key=sample.key)
    quadrant.key = quadrant.meta["key"]
    return quadrant


def crop_sample(sample: Sample, y: int, x: int, size: int) -> Sample:
    """A size x size window at (y, x) of every member, with its grid, footprint and fractions recomputed."""
    arrays = {}
    for member, array in sample.arrays.items():
        factor = RESOLUTION_GROUPS[member][1] if member in RESOLUTION_GROUPS else 1
        arrays[member] = np.ascontiguousarray(
            array[..., y // factor : (y + size) // factor, x // factor : (x + size) // factor])
    meta = dict(sample.meta)
    a, b, c, d, e, f = meta["transform"][:6]
    transform = [a, b, c + a * x + b * y, d, e, f + d * x + e * y]  # the window's upper-left corner
    meta.update(transform=transform, shape=[size, size], window=[y, x],
                **corners_lonlat_from_transform(meta["crs"], transform, (size, size)),
                cloud_cover=cloud_cover_percent(arrays[CLOUD]), cloud_cover_pixels=cloud_cover_percent(arrays[CLOUD]),
                nodata=nodata_fraction(arrays["s2_10m"]), tile_cloud_cover=sample.meta["cloud_cover"])
    meta["labels"] = {name: info | {"coverage": _coverage(arrays[LABEL_PREFIX + name], info.get("nodata"))}
                      for name, info in sample.meta.get("labels", {}).items()}
    return Sample(sample.key, meta, arrays, thumb_jpg=None)


def _coverage(layer: np.ndarray, nodata: float | None) -> float:
    return 1.0 if nodata is None else round(float(np.mean(layer != nodata)), 6)
