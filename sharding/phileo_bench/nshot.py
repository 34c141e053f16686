"""n-shot selection of PhilEO Bench patches, exactly as the benchmark's `protocol_fewshot_memmapped`.

Per bucket (phileo.phileo_bench.REGION_BUCKETS, in that order) the train pool is the concatenation,
over the bucket's sub-regions in the bucket's order, of each sub-region's `*train_s2.npy` files
(sorted by name) that have the task's label file; the val pool likewise from the val files.
n_train = min(n, len(pool)), n_val = min(ceil(0.2 n), len(val pool)).

- landcover: `random.Random(seed).sample(range(L), n_train)`, val with a fresh Random(seed).
- roads/buildings: walk `random.Random(seed).sample(range(L), L)`, keep a patch if
  mean(label) > 0.005 (val: 0.01) on the values as stored (as the benchmark: so the default seed
  reproduces its selection whatever --density-scale says), else keep it if `rng.random() > 0.75`, with
  rng = Random(156) created once per bucket and shared by train then val; stop at n.
- `--indices DIR`: the benchmark's `indices_*_{name}_{task}_{n}.json` files, lengths checked.
"""

from __future__ import annotations

import bisect
import json
import logging
import random
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from phileo.phileo_bench import PATCH_SIZE, REGION_BUCKETS, nshot_val_count
from sharding.errors import InputError
from sharding.sources.phileo_bench import NpyReadError, NpyRef, TileFiles, open_npy

log = logging.getLogger(__name__)

DEFAULT_SEED = 12345
EMPTY_SEED = 156  # the benchmark's Random(156) for keeping patches below the threshold
KEEP_EMPTY_ABOVE = 0.75
THRESHOLDS = {"train": 0.005, "val": 0.01}
TASK_FILE = {"roads": "roads", "buildings": "building", "landcover": "lc"}  # task name in index file names
DENSITY_SCALES = ("auto", "1", "100")


@dataclass
class Pool:
    """Patches of one bucket and split: the concatenation of `tiles`' rows."""

    tiles: list[TileFiles] = field(default_factory=list)

    @property
    def starts(self) -> list[int]:
        starts = [0]
        for tile in self.tiles:
            starts.append(starts[-1] + tile.rows)
        return starts

    def __len__(self) -> int:
        return sum(tile.rows for tile in self.tiles)

    def locate(self, index: int) -> tuple[TileFiles, int]:
        starts = self.starts
        part = bisect.bisect_right(starts, index) - 1
        return self.tiles[part], index - starts[part]


def bucket_pools(tiles: list[TileFiles], task: str, split: str, buckets: tuple[str, ...] = ()) -> dict[str, Pool]:
    """{bucket: pool} for buckets with at least one file (tiles must be sorted by s2 name); `buckets`
    (the benchmark's `regions` argument) keeps only those, in bucket order; () keeps all."""
    pools = {}
    for bucket, regions in REGION_BUCKETS.items():
        if buckets and bucket not in buckets:
            continue
        pool = Pool([t for region in regions for t in tiles
                     if t.region == region and t.split == split and task in t.labels])
        if pool.tiles:
            pools[bucket] = pool
    return pools


def density_scale(max_value: float | None, mode: str) -> int:
    """`--density-scale`: 1 or 100 as given; auto = 100 when the file's maximum exceeds 1.0, else 1."""
    if mode != "auto":
        return int(mode)
    return 100 if max_value is not None and max_value > 1.0 else 1


def check_label_stream(stream, task: str, rows: int | None = None, patch_size: int = PATCH_SIZE) -> str | None:
    """Why a label file cannot be used (None if fine): row shape, dtype, row count against the s2 file."""
    name = stream.ref.name
    if stream.row_shape not in ((patch_size, patch_size, 1), (patch_size, patch_size)):
        return f"{name} has rows of shape {stream.row_shape}, expected ({patch_size}, {patch_size}, 1)"
    kinds = "iu" if task == "landcover" else "fiu"
    if stream.dtype.kind not in kinds:
        return f"{name} has dtype {stream.dtype}, expected {'an integer' if task == 'landcover' else 'a float'} dtype"
    if rows is not None and stream.rows != rows:
        return f"{name} has {stream.rows} rows, the s2 file has {rows}"
    return None


def scan_label_file(ref_json: dict, task: str, scales: tuple[int, ...], patch_size: int = PATCH_SIZE,
                    progress: Callable[[int], None] | None = None) -> dict:
    """One streaming pass: {"rows", "max" (NaN-ignoring), "means": {scale: [mean(row / scale)]}, "error"}.

    Means are computed in the stored dtype, like the benchmark's `np.mean(label)`. On a read
    error the means gathered so far are kept, "error" is set and "max" is None.
    """
    ref = NpyRef.from_json(ref_json)
    result: dict = {"rows": 0, "max": None, "means": {str(s): [] for s in scales}, "error": None}
    running = None
    try:
        with ExitStack() as stack:
            stream = open_npy(ref, stack)
            result["rows"] = stream.rows
            problem = check_label_stream(stream, task, patch_size=patch_size)
            if problem:
                raise NpyReadError(problem)
            for _, row in stream.iter_rows():
                peak = np.fmax.reduce(row, axis=None)
                running = peak if running is None else np.fmax(running, peak)
                for scale in scales:
                    value = np.mean(row) if scale == 1 else np.mean(row / row.dtype.type(scale))
                    result["means"][str(scale)].append(float(value))
                if progress is not None:
                    progress(1)
    except NpyReadError as error:
        result["error"] = str(error)
        return result
    result["max"] = None if running is None or np.isnan(running) else float(running)
    return result


def _walk(order: list[int], means: np.ndarray, threshold: float, count: int, rng: random.Random) -> list[int]:
    chosen = []
    for index in order:
        if float(means[index]) > threshold:  # NaN (unreadable row) is never above
            chosen.append(index)
        elif rng.random() > KEEP_EMPTY_ABOVE:
            chosen.append(index)
        if len(chosen) == count:
            break
    return chosen


def seeded_indices(task: str, n: int, seed: int, train_len: int, val_len: int,
                   means: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[list[int], list[int]]:
    """(train, val) pool positions for one bucket; `means` (train, val) per position for roads/buildings."""
    n_train, n_val = min(n, train_len), min(nshot_val_count(n), val_len)
    if task == "landcover":
        return (random.Random(seed).sample(range(train_len), n_train),
                random.Random(seed).sample(range(val_len), n_val))
    if means is None:
        raise ValueError(f"{task}: label means are needed for the seeded selection")
    rng = random.Random(EMPTY_SEED)
    train = _walk(random.Random(seed).sample(range(train_len), train_len), means[0], THRESHOLDS["train"],
                  n_train, rng)
    val = _walk(random.Random(seed).sample(range(val_len), val_len), means[1], THRESHOLDS["val"], n_val, rng)
    return train, val


def find_index_file(directory: str, name: str, task: str, n: int) -> tuple[str, dict]:
    """(file name, content) of DIR/indices_*_{name}_{task}_{n}.json; identical duplicates are fine."""
    root = Path(directory)
    if not root.is_dir():
        raise InputError(f"--indices {directory}: not a directory")
    pattern = f"indices_*_{name}_{TASK_FILE[task]}_{n}.json"
    files = sorted(root.glob(pattern))
    if not files:
        raise InputError(f"--indices {directory}: no {pattern} for --task {task} --n-shot {n}")
    contents = []
    for path in files:
        try:
            contents.append(json.loads(path.read_text()))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise InputError(f"--indices {path}: not a readable JSON file ({error})") from error
    for path, content in zip(files[1:], contents[1:]):
        if content != contents[0]:
            raise InputError(f"--indices: {files[0].name} and {path.name} both match {pattern} but differ; "
                             "remove one of them")
    return files[0].name, contents[0]


def _checked_list(values, length: int, what: str) -> list[int]:
    if not isinstance(values, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise InputError(f"{what}: expected a list of integers")
    bad = [v for v in values if not 0 <= v < length]
    if bad:
        raise InputError(f"{what}: index {bad[0]} is outside the pool of {length} patches")
    if len(set(values)) != len(values):
        raise InputError(f"{what}: holds duplicate indices")
    return list(values)


def indexed_indices(content: dict, source: str, bucket: str, train_len: int,
                    val_len: int) -> tuple[list[int], list[int]]:
    """(train, val) of one bucket from an index file, after checking its pool lengths against ours."""
    entry = content.get(bucket) if isinstance(content, dict) else None
    if not isinstance(entry, dict):
        raise InputError(f"--indices {source}: no entry for bucket {bucket!r}")
    for key, length in (("length_multi_array_train", train_len), ("length_multi_array_val", val_len)):
        if entry.get(key) != length:
            raise InputError(f"--indices {source}: bucket {bucket} has {key} {entry.get(key)}, but this input has "
                             f"{length} patches there; the dataset version differs from the index file's")
    return (_checked_list(entry.get("train_indices"), train_len, f"--indices {source}: {bucket} train_indices"),
            _checked_list(entry.get("val_indices"), val_len, f"--indices {source}: {bucket} val_indices"))


def make_selection(task: str, n: int, pools: dict[str, dict[str, Pool]], *, seed: int | None = None,
                   index: tuple[str, dict] | None = None,
                   means: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
                   buckets: tuple[str, ...] = ()) -> dict:
    """The manifest's "selection" for one task and n: seeded (`seed`, `means`) or from an index file;
    `buckets`: the --regions the pools were limited to (recorded; () = all)."""
    selection: dict = {"task": task, "n": n, "method": "indices" if index else "seeded"}
    if buckets:
        selection["regions"] = list(buckets)
    excluded = [bucket for bucket in REGION_BUCKETS if buckets and bucket not in buckets]
    if index:
        selection["indices_file"] = index[0]
        skipped = sorted(set(index[1]) - set(pools["train"]) - set(excluded)) if isinstance(index[1], dict) else []
        if skipped:
            log.warning("%s: buckets %s have no %s files in this input; skipped", index[0], skipped, task)
    else:
        selection["seed"] = seed
    buckets = {}
    for bucket, train_pool in pools["train"].items():
        val_pool = pools["val"].get(bucket, Pool())
        train_len, val_len = len(train_pool), len(val_pool)
        if index:
            train, val = indexed_indices(index[1], index[0], bucket, train_len, val_len)
        else:
            train, val = seeded_indices(task, n, seed, train_len, val_len, means.get(bucket) if means else None)
        buckets[bucket] = {"train_indices": train, "val_indices": val, "length_train": train_len,
                           "length_val": val_len}
    selection["buckets"] = buckets
    return selection


def selected_rows(selection: dict, pools: dict[str, dict[str, Pool]], split: str) -> dict[str, list[int]]:
    """{s2 display: sorted rows} of the patches a selection takes from `split` ("train" or "val")."""
    rows: dict[str, set[int]] = {}
    for bucket, chosen in selection["buckets"].items():
        pool = pools[split].get(bucket, Pool())
        for index in chosen[f"{split}_indices"]:
            tile, row = pool.locate(index)
            rows.setdefault(tile.s2.display, set()).add(row)
    return {display: sorted(found) for display, found in rows.items()}


def pool_means(pool: Pool, task: str, scans: dict[str, dict]) -> np.ndarray:
    """mean(label) as stored per pool position from the scans; NaN where a row could not be read."""
    values = np.full(len(pool), np.nan, dtype=np.float64)
    for tile, start in zip(pool.tiles, pool.starts):
        means = scans[tile.labels[task].display]["means"].get("1", [])[: tile.rows]
        values[start : start + len(means)] = means
    return values
