"""Percentage-split selection of PhilEO Bench files, as the benchmark's `protocol_split`.

The benchmark (utils/data_protocol.py:121 `protocol_split`) reads a CSV next to the data with one
row per train s2 file and its `samples` (rows); we take the same numbers from the npy headers.
Per region bucket it sorts the table by `samples` (`df.sort_values`, numpy's quicksort), shuffles
the bucket's rows (`df[mask].sample(frac=1)`: numpy's global RandomState, seeded 1234 at import
and shared by the buckets in turn), takes the cumulative sum of `samples`, finds the row whose sum
is closest to `int(total * P)` and keeps the files before it; each train file's val counterpart
(same name, `train` -> `val`) forms the val set. Files without the task's label are dropped after
the cut (`sanity_check_labels_exist`).

Two of its steps are bugs, so `--split-protocol` chooses:

- `fixed` (default): a bucket's files are those of its sub-regions (phileo.phileo_bench
  REGION_BUCKETS) that have the task's label; the cut keeps the closest row too (the benchmark
  counts it in `shots_per_region` but leaves it out, so P = 1 loses a file); each bucket draws
  from its own RandomState(seed, bucket number), so a bucket's files do not depend on which other
  buckets are chosen; the sort is stable (ties by file name).
- `bench`: the benchmark's choice exactly. Its mask `[region in f for f in df.iloc[:, 0]]`
  overwrites the sub-region mask (data_protocol.py:153), so a bucket takes only the files whose
  name contains the bucket's own name (`northwest-africa` none at all), and the cut excludes the
  closest row. The CSV's row order is taken as file-name order (quicksort may order files with
  equal `samples` differently for another CSV order).
"""

from __future__ import annotations

import numpy as np

from phileo.phileo_bench import REGION_BUCKETS
from sharding.sources.phileo_bench import TileFiles

SPLIT_SEED = 1234  # data_protocol.py:17 np.random.seed(1234)
SPLIT_PROTOCOLS = ("fixed", "bench")


def _cut(samples: np.ndarray, ratio: float, inclusive: bool) -> tuple[int, int]:
    """(files kept, patches counted by the benchmark's shots_per_region) of shuffled per-file counts."""
    cumsum = np.cumsum(samples)
    target = int(samples.sum() * ratio)
    distance = np.abs(cumsum - target)
    # pandas Series.argsort()[:1] is numpy's quicksort; the first of equal distances wins as there
    closest = int(np.argsort(distance, kind="quicksort")[0]) if not inclusive else int(np.argmin(distance))
    return closest + 1 if inclusive else closest, int(cumsum[closest])


def _counterparts(chosen: list[TileFiles], tiles: list[TileFiles], task: str) -> tuple[list, list]:
    """(chosen train tiles with the task's label, the val tiles of all chosen ones that have it): the
    benchmark checks train and val labels apart (data_protocol.py:176-177)."""
    val_tiles = {(t.region, t.tile): t for t in tiles if t.split == "val" and task in t.labels}
    return ([t for t in chosen if task in t.labels],
            [val_tiles[(t.region, t.tile)] for t in chosen if (t.region, t.tile) in val_tiles])


def _bucket_table(tiles: list[TileFiles], bucket: str, task: str, protocol: str) -> list[TileFiles]:
    """The bucket's train files in sorted order (before the shuffle)."""
    train = [t for t in tiles if t.split == "train"]
    if protocol == "bench":
        order = np.argsort(np.array([t.rows for t in train], dtype=np.int64), kind="quicksort")
        return [train[i] for i in order if bucket in train[i].s2.name]
    regions = REGION_BUCKETS[bucket]
    return sorted((t for t in train if t.region in regions and task in t.labels), key=lambda t: (t.rows, t.s2.name))


def split_selection(tiles: list[TileFiles], task: str, ratio: float, buckets: tuple[str, ...], protocol: str,
                    seed: int = SPLIT_SEED) -> tuple[dict, dict[str, list[TileFiles]]]:
    """(manifest "selection", {"train": tiles, "val": tiles}) of one task and ratio.

    `tiles` sorted by s2 name; `buckets` in the order the benchmark walks them (its `regions`).
    """
    assert protocol in SPLIT_PROTOCOLS and 0 < ratio <= 1
    shared = np.random.RandomState(seed)
    selection: dict = {"task": task, "p": ratio, "method": f"split-{protocol}", "seed": seed, "buckets": {}}
    chosen: dict[str, list[TileFiles]] = {"train": [], "val": []}
    for bucket in buckets:
        table = _bucket_table(tiles, bucket, task, protocol)
        if not table:
            continue
        rng = shared if protocol == "bench" else np.random.RandomState([seed, list(REGION_BUCKETS).index(bucket)])
        shuffled = [table[i] for i in rng.permutation(len(table))]
        kept, counted = _cut(np.array([t.rows for t in shuffled], dtype=np.int64), ratio, protocol == "fixed")
        train, val = _counterparts(shuffled[:kept], tiles, task)
        chosen["train"] += train
        chosen["val"] += val
        selection["buckets"][bucket] = {
            "train_files": [t.s2.display for t in train], "val_files": [t.s2.display for t in val],
            "length_train": sum(t.rows for t in table), "target": int(sum(t.rows for t in table) * ratio),
            "counted": counted, "patches_train": sum(t.rows for t in train), "patches_val": sum(t.rows for t in val)}
    for split in chosen:
        chosen[split].sort(key=lambda t: t.s2.name)
    return selection, chosen
