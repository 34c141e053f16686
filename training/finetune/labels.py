"""Per-patch classification targets computed from the dense PhilEO Bench labels, in the data pipeline.

The bench's classification tasks read `*_label_{task}.npy` files that were never published, nor how
they were made. What its code shows: one vector per patch (metrics take `labels.argmax(axis=1)`,
CrossEntropyLoss takes the vectors), 11 / 5 / 2 classes. Our definitions, from the labels we have:

* landcover-classification: the fraction of the patch's valid pixels in each of the 11 WorldCover
  classes (a soft target; its argmax is the dominant class). A patch without a valid pixel gets the
  zero vector: it adds nothing to the loss and is left out of the metrics.
* buildings-classification: one-hot of the building level of the patch's mean building density
  (phileo/phileo_bench.py BUILDING_LEVEL_EDGES: 0 exactly = no urbanization, then sparse, moderate,
  significant, extreme).
* roads-classification: one-hot of "roads" when any pixel has a road density above 0, else "no roads".
"""

from __future__ import annotations

import numpy as np

from phileo.phileo_bench import BUILDING_LEVEL_EDGES, CLASSIFICATION_TASKS, IGNORE_CLASS, landcover_lookup, num_classes

_LANDCOVER_CLASSES = np.array(landcover_lookup(), dtype=np.uint8)


def landcover_classes(codes: np.ndarray) -> np.ndarray:
    """WorldCover codes -> class indices 0..10 (uint8, same shape); codes outside WorldCover -> IGNORE_CLASS."""
    return _LANDCOVER_CLASSES[codes]


def landcover_fractions(codes: np.ndarray) -> np.ndarray:
    """WorldCover codes (any shape) -> (11,) float32 class fractions over the valid pixels (zeros if none)."""
    classes = landcover_classes(codes.reshape(-1))
    counts = np.bincount(classes[classes != IGNORE_CLASS], minlength=num_classes("landcover-classification"))
    total = counts.sum()
    return (counts / total).astype(np.float32) if total else np.zeros(counts.shape, np.float32)


def building_level(density: np.ndarray) -> int:
    """Building level 0..4 of a density map on the 0..1 scale, from its mean."""
    coverage = float(density.mean(dtype=np.float64))
    if coverage <= 0:
        return 0
    return 1 + int(np.searchsorted(BUILDING_LEVEL_EDGES, coverage, side="left"))


def has_roads(density: np.ndarray) -> int:
    return int((density > 0).any())


def one_hot(index: int, classes: int) -> np.ndarray:
    vector = np.zeros(classes, np.float32)
    vector[index] = 1.0
    return vector


def class_target(task: str, label: np.ndarray, density_scale: float = 1.0) -> np.ndarray:
    """The per-patch target vector (float32, (classes,)) of classification `task` from its dense label.

    `label` is the shard member as stored: WorldCover codes, or a density map with `density_scale`
    meaning full coverage.
    """
    dense = CLASSIFICATION_TASKS[task]
    if dense == "landcover":
        return landcover_fractions(label)
    density = label.astype(np.float32) / np.float32(density_scale)
    index = building_level(density) if dense == "buildings" else has_roads(density)
    return one_hot(index, num_classes(task))
