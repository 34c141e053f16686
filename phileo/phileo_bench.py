"""PhilEO Bench downstream data: tasks, label members, region buckets, land-cover classes.

Shared by the `--source phileo-bench` build (sharding/) and fine-tuning (training/): a
PhilEO Bench sample is one square patch with the `s2_stack` member and its task labels: 128 x 128
at 10 m in the main set, 224 x 224 at 10 m (Sentinel-2) or 30 m (HLS) in the benchmark's other two
sets (training_script.py data_path_224_10m / data_path_224_30m). A build's patch size follows its
data and is recorded in its manifests with the ground sample distance.
"""

from __future__ import annotations

import math

SOURCE = "phileo-bench"
SPLITS: tuple[str, ...] = ("train", "val", "test")
PATCH_SIZE = 128  # the main set's; a build takes its size from the s2 files
GSD_METRES: tuple[int, ...] = (10, 30)  # Sentinel-2 sets, HLS set

# task name (CLI) -> (label member in the shard, file kind in the npy layout)
TASKS: dict[str, tuple[str, str]] = {
    "roads": ("label_roads", "label_roads"),
    "buildings": ("label_buildings", "label_building"),
    "landcover": ("label_landcover", "label_lc"),
}
REGRESSION_TASKS: tuple[str, ...] = ("roads", "buildings")

# ESA WorldCover codes -> the 11 classes of the benchmark (pb/utils/load_data.py), in class order.
WORLDCOVER_CODES: tuple[int, ...] = (10, 20, 30, 40, 50, 60, 70, 80, 90, 95, 100)
WORLDCOVER_NAMES: tuple[str, ...] = ("tree cover", "shrubland", "grassland", "cropland", "built-up",
                                     "bare / sparse", "snow and ice", "water", "herbaceous wetland",
                                     "mangroves", "moss and lichen")
NUM_LANDCOVER_CLASSES = len(WORLDCOVER_CODES)
IGNORE_CLASS = 255  # pixels with a code outside WORLDCOVER_CODES (e.g. 0 = no data): ignored in loss and metrics

# The 20 sub-regions grouped into the 6 n-shot buckets (pb/utils/data_protocol.py), in bucket order.
REGION_BUCKETS: dict[str, tuple[str, ...]] = {
    "europe": ("europe", "denmark-1", "denmark-2"),
    "east-africa": ("east-africa", "tanzania-1", "tanzania-2", "tanzania-3", "tanzania-4", "tanzania-5", "uganda-1"),
    "northwest-africa": ("eq-guinea", "ghana-1", "egypt-1", "israel-1", "israel-2", "nigeria", "senegal"),
    "north-america": ("north-america",),
    "south-america": ("south-america",),
    "japan": ("japan",),
}
REGIONS: tuple[str, ...] = tuple(sorted(r for regions in REGION_BUCKETS.values() for r in regions))
NSHOT_VAL_RATIO = 0.2

# Per-patch classification tasks (the bench's lc_classification / building_classification /
# roads_classification) -> the dense task whose label they are computed from. The bench never published
# its `*_label_{task}.npy` files; our definitions are in training/finetune/labels.py and docs/format.md.
CLASSIFICATION_TASKS: dict[str, str] = {
    "landcover-classification": "landcover",
    "buildings-classification": "buildings",
    "roads-classification": "roads",
}
CLASS_NAMES: dict[str, tuple[str, ...]] = {
    "landcover-classification": WORLDCOVER_NAMES,
    # pb/utils/training_loops.py TrainClassificationBuildings / TrainClassificationRoads val_visualize
    "buildings-classification": ("no urbanization", "sparse urbanization", "moderate urbanization",
                                 "significant urbanization", "extreme urbanization"),
    "roads-classification": ("no roads", "roads"),
}
# The bench's CrossEntropyLoss weights (utils/training_loops.py TrainClassificationBuildings / Roads
# set_criterion). They sum to 1: they are the class FREQUENCIES of its labels, not inverse frequencies,
# so they weight the common classes up. Land cover had none.
BENCH_CLASS_WEIGHTS: dict[str, tuple[float, ...] | None] = {
    "landcover-classification": None,
    "buildings-classification": (2.65209613e-01, 6.95524031e-01, 3.12650858e-02, 7.95257252e-03, 4.86978615e-05),
    "roads-classification": (0.37228453, 0.62771547),
}
# Building levels: mean building density of the patch (0..1). 0 exactly: no urbanization; then
# (0, 0.1] sparse, (0.1, 0.2] moderate, (0.2, 0.4] significant, > 0.4 extreme. Chosen so the level
# frequencies can resemble the bench's (26.5 %, 69.6 %, 3.1 %, 0.8 %, 0.005 %): most inhabited
# 1.28 km patches are sparse; a 40 % built-over patch is a dense city core.
BUILDING_LEVEL_EDGES: tuple[float, ...] = (0.1, 0.2, 0.4)


def num_classes(task: str) -> int:
    """Output width of a classification task (11 land-cover classes, 5 building levels, 2 road classes)."""
    return len(CLASS_NAMES[task])


def indices_name(patch_size: int, gsd: int) -> str:
    """{name} in the benchmark's index files: 128_10M for the main set (pb/indices), else e.g. 224_30m
    (indices/indices_16012024_224_30m_lc_50.json)."""
    return "128_10M" if (patch_size, gsd) == (PATCH_SIZE, 10) else f"{patch_size}_{gsd}m"


def subset_suffix(axis: str, value: float) -> str:
    """"n50" for an n-shot subset (axis "n"), "p0.1" / "p1" for a split-ratio one (axis "p", P as %g)."""
    assert axis in ("n", "p"), axis
    return f"n{int(value)}" if axis == "n" else f"p{value:g}"


def subset_name(task: str, axis: str, value: float) -> str:
    """The directory of a training subset, `{task}-n{n}` or `{task}-p{P}`: where `phileo-shard build` writes
    it and `phileo-train nshot-sweep` reads it."""
    return f"{task}-{subset_suffix(axis, value)}"


def bucket_of(region: str) -> str:
    for bucket, regions in REGION_BUCKETS.items():
        if region in regions:
            return bucket
    raise KeyError(f"unknown PhilEO Bench region {region!r}; expected one of {', '.join(REGIONS)}")


def nshot_val_count(n: int) -> int:
    """Validation samples per bucket for an n-shot training set: ceil(0.2 n), as the benchmark."""
    return math.ceil(n * NSHOT_VAL_RATIO)


def landcover_lookup() -> list[int]:
    """A 256-entry table: WorldCover code -> class index, IGNORE_CLASS for any other code."""
    table = [IGNORE_CLASS] * 256
    for index, code in enumerate(WORLDCOVER_CODES):
        table[code] = index
    return table
