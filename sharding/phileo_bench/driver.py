"""`phileo-shard build --source phileo-bench`: PhilEO Bench downstream npy files -> datasets of shards.

Without n-shot: OUT/train, OUT/val, OUT/test. With `--task/--n-shot` (seeded, or `--indices`):
OUT/test (the full test split of every region) and OUT/{task}-n{n}/train|val holding only the
selected patches, the selection saved in their manifests; with `--task/--split-ratio` likewise
OUT/{task}-p{P}/train|val (whole files, split.py). `--regions` limits the train/val selections to
some region buckets; the test set stays the full one. The patch size follows the s2 files (one
size per build) and is recorded with the ground sample distance in build.json and the manifests.
Each is a normal dataset directory (shards/, units/, index.parquet, rejected.jsonl, manifest.json
last). OUT/plan.json is the saved plan (units, selections, density scales), OUT/build.json the
arguments (written last when planning, checked on resume). A unit is one s2 npy file of one output dataset.
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

from phileo import __version__
from phileo.phileo_bench import (
    GSD_METRES,
    PATCH_SIZE,
    REGION_BUCKETS,
    REGRESSION_TASKS,
    SOURCE,
    SPLITS,
    TASKS,
    subset_name,
)
from phileo.phileo_bench import indices_name as default_indices_name
from phileo.schema import DEFAULT_CLEVEL, SCHEMA_VERSION
from sharding.build.distributor import run_jobs
from sharding.build.manifest import finalize
from sharding.build.output_dir import open_build_output
from sharding.build.output_lock import output_lock
from sharding.build.writer import atomic_write, check_codec_environment
from sharding.errors import InputError
from sharding.layout import (
    BUILD_INFO,
    PHILEO_BENCH_PLAN,
    SHARDS_DIR,
    UNITS_DIR,
    unit_stats_path,
)
from sharding.phileo_bench.nshot import (
    DEFAULT_SEED,
    DENSITY_SCALES,
    Pool,
    bucket_pools,
    density_scale,
    find_index_file,
    make_selection,
    pool_means,
    scan_label_file,
    selected_rows,
)
from sharding.phileo_bench.split import SPLIT_PROTOCOLS, SPLIT_SEED, split_selection
from sharding.phileo_bench.unit import PhilEOBenchUnitOptions, build_phileo_bench_unit, phileo_bench_index_schema
from sharding.sources.phileo_bench import TileFiles, common_patch_size, group_tiles, scan_inputs

log = logging.getLogger(__name__)

_NSHOT_DIR = re.compile(r"^(" + "|".join(TASKS) + r")-(n\d+|p[0-9.e-]+)$")


@dataclass(frozen=True)
class PhilEOBenchArgs:
    """The arguments that define a PhilEO Bench build: a rerun must repeat them exactly to resume."""

    inputs: tuple[str, ...]
    output: str
    tasks: tuple[str, ...] = ()
    n_shots: tuple[int, ...] = ()
    seed: int = DEFAULT_SEED
    indices: str | None = None
    indices_name: str = "auto"  # auto: 128_10M, or {size}_{gsd}m for the 224 px sets
    density_scale: str = "auto"
    shard_size: int = 1_000_000_000
    clevel: int = DEFAULT_CLEVEL
    regions: tuple[str, ...] = ()  # region buckets of the train/val selections, in the order given
    split_ratios: tuple[float, ...] = ()
    split_protocol: str = "fixed"
    split_seed: int = SPLIT_SEED
    gsd: int | None = None  # metres; None: 30 when an input's path names HLS or 30m, else 10

    def __post_init__(self) -> None:
        object.__setattr__(self, "inputs", tuple(self.inputs))
        object.__setattr__(self, "tasks", tuple(dict.fromkeys(self.tasks)))
        object.__setattr__(self, "n_shots", tuple(sorted(set(self.n_shots))))
        object.__setattr__(self, "regions", tuple(dict.fromkeys(self.regions)))
        object.__setattr__(self, "split_ratios", tuple(sorted(set(self.split_ratios))))
        if not self.inputs:
            raise InputError("--input: give at least one directory, .zip or .zip.001 file")
        unknown = [task for task in self.tasks if task not in TASKS]
        if unknown:
            raise InputError(f"--task {unknown[0]!r}: expected one or more of {', '.join(TASKS)}")
        if bool(self.tasks) != bool(self.n_shots or self.split_ratios):
            raise InputError("--task goes with --n-shot and/or --split-ratio: give both for selected datasets, "
                             "or neither")
        self._check_protocol_args()
        if self.indices and not self.tasks:
            raise InputError("--indices needs --task and --n-shot (the index files are per task and n)")
        if any(n < 1 for n in self.n_shots):
            raise InputError(f"--n-shot {min(self.n_shots)}: expected positive numbers of patches")
        if self.density_scale not in DENSITY_SCALES:
            raise InputError(f"--density-scale {self.density_scale!r}: expected one of {', '.join(DENSITY_SCALES)}")
        if self.shard_size < 1:
            raise InputError(f"--shard-size {self.shard_size}: expected a positive number of bytes")
        if not 0 <= self.clevel <= 9:
            raise InputError(f"--clevel {self.clevel}: expected 0..9")

    def _check_protocol_args(self) -> None:
        unknown = [bucket for bucket in self.regions if bucket not in REGION_BUCKETS]
        if unknown:
            raise InputError(f"--regions {unknown[0]!r}: not a region bucket; expected some of "
                             f"{', '.join(REGION_BUCKETS)}")
        if self.regions and not self.tasks:
            raise InputError("--regions selects the train/val buckets of --n-shot or --split-ratio datasets; "
                             "give --task with one of them")
        bad = [p for p in self.split_ratios if not 0 < p <= 1]
        if bad:
            raise InputError(f"--split-ratio {bad[0]}: expected fractions in (0, 1], e.g. 0.1,0.5,1")
        if self.split_protocol not in SPLIT_PROTOCOLS:
            raise InputError(f"--split-protocol {self.split_protocol!r}: expected one of {', '.join(SPLIT_PROTOCOLS)}")
        if self.gsd is not None and self.gsd not in GSD_METRES:
            raise InputError(f"--gsd {self.gsd}: expected one of {', '.join(map(str, GSD_METRES))} (metres)")

    def selection_names(self, task: str) -> list[str]:
        """The `{task}-n{n}` and `{task}-p{P}` directories of one task."""
        return ([subset_name(task, "n", n) for n in self.n_shots]
                + [subset_name(task, "p", p) for p in self.split_ratios])

    def dataset_names(self) -> list[str]:
        if not self.tasks:
            return list(SPLITS)
        return ["test"] + [f"{name}/{split}" for task in self.tasks for name in self.selection_names(task)
                           for split in ("train", "val")]

    def buckets(self) -> tuple[str, ...]:
        """The buckets of the selections: --regions in the order given, else all in bucket order."""
        return self.regions or tuple(REGION_BUCKETS)

    def resolved_gsd(self) -> tuple[int, str]:
        """(metres, why): --gsd, else 30 when an input's name (or a file input's folder) names the HLS set
        (HLS, 30m), else 10."""
        if self.gsd is not None:
            return self.gsd, "--gsd"
        for path in map(Path, self.inputs):  # the benchmark's folder: downstream_dataset_patches_np_HLS
            names = (path.resolve().name, path.resolve().parent.name if path.is_file() else "")
            if any("hls" in name.lower() or "30m" in name.lower() for name in names):
                return 30, f"input {path}"
        return 10, "default"

    def defining(self) -> dict:
        """JSON of what the datasets depend on (not where they are written)."""
        args = asdict(self)
        args.pop("output")
        args["inputs"] = [str(Path(path).resolve()) for path in self.inputs]
        args["indices"] = str(Path(self.indices).resolve()) if self.indices else None
        args["tasks"], args["n_shots"] = list(self.tasks), list(self.n_shots)
        args["regions"], args["split_ratios"] = list(self.regions), list(self.split_ratios)
        return args


@dataclass
class PhilEOBenchSummary:
    written: int = 0
    rejected: int = 0
    shards: int = 0
    bytes_out: int = 0
    datasets: int = 0
    seconds: float = 0.0
    failed_units: list[dict] = field(default_factory=list)

    def line(self) -> str:
        rate = self.written / self.seconds if self.seconds else 0.0
        return (f"wrote {self.written} patches in {self.shards} shards ({self.bytes_out / 1e6:.1f} MB) into "
                f"{self.datasets} datasets, rejected {self.rejected}, in {self.seconds:.1f} s "
                f"({rate:.1f} patches/s)")


def prepare_output(args: PhilEOBenchArgs, overwrite: bool) -> dict | None:
    """Create/clean the output; return the saved build info when resuming, else None."""
    return open_build_output(Path(args.output), _owned, overwrite, args.defining(), source=SOURCE)


def _owned(name: str) -> bool:
    """The build's files and its dataset directories (splits, task-nN)."""
    return name in (BUILD_INFO, PHILEO_BENCH_PLAN, *SPLITS) or bool(_NSHOT_DIR.match(name))


def _full_units(tiles: list[TileFiles], split: str) -> list[dict]:
    return [{"tile": tile.to_json(), "rows": None} for tile in tiles if tile.split == split]


def _scan_pools(pools: dict[str, dict[str, Pool]], task: str, mode: str, workers: int,
                patch_size: int) -> dict[str, dict]:
    """{label file display: scan} over every file of the train and val pools (one streaming pass)."""
    files = {tile.labels[task].display: tile.labels[task]
             for by_bucket in pools.values() for pool in by_bucket.values() for tile in pool.tiles}
    refs = [files[display] for display in sorted(files)]
    scales = (1, 100) if mode == "auto" else tuple(sorted({1, int(mode)}))  # 1: the selection's raw means
    total = sum(tile.rows for by_bucket in pools.values() for pool in by_bucket.values() for tile in pool.tiles)
    scans = {}
    with tqdm(total=total, unit="patch", desc=f"{task} label means", dynamic_ncols=True) as bar:
        for number, result in run_jobs(scan_label_file, [(ref.to_json(), task, scales, patch_size) for ref in refs],
                                       workers,
                                       bar.update):
            if "traceback" in result:
                raise RuntimeError(f"scanning {refs[number].display} failed: {result['error']}\n{result['traceback']}")
            if result["error"]:
                log.warning("%s: %s (its patches count as empty in the selection)", refs[number].display,
                            result["error"])
            scans[refs[number].display] = result
    return scans


def _nshot_datasets(args: PhilEOBenchArgs, tiles: list[TileFiles], workers: int,
                    data: dict) -> tuple[dict, dict[str, int]]:
    """({dataset name: dataset}, {label file: density scale}) of the n-shot datasets."""
    index_files = {(task, n): find_index_file(args.indices, data["indices_name"], task, n)
                   for task in args.tasks for n in args.n_shots} if args.indices else {}
    datasets, scales = {}, {}
    for task in args.tasks if args.n_shots else ():
        pools = {split: bucket_pools(tiles, task, split, args.regions) for split in ("train", "val")}
        means = None
        if not args.indices and task in REGRESSION_TASKS:
            scans = _scan_pools(pools, task, args.density_scale, workers, data["patch_size"])
            scales |= {display: density_scale(scan["max"], args.density_scale)
                       for display, scan in scans.items() if not scan["error"]}
            means = {bucket: (pool_means(pool, task, scans),
                              pool_means(pools["val"].get(bucket, Pool()), task, scans))
                     for bucket, pool in pools["train"].items()}
        for n in args.n_shots:
            selection = make_selection(task, n, pools, seed=args.seed, index=index_files.get((task, n)), means=means,
                                       buckets=args.regions)
            for split in ("train", "val"):
                rows = selected_rows(selection, pools, split)
                units = [{"tile": tile.to_json(), "rows": rows[tile.s2.display]}
                         for tile in tiles if tile.s2.display in rows]
                datasets[f"{subset_name(task, 'n', n)}/{split}"] = {"split": split, "units": units,
                                                                    "selection": selection}
    return datasets, scales


def _split_datasets(args: PhilEOBenchArgs, tiles: list[TileFiles]) -> dict:
    """{dataset name: dataset} of the --split-ratio datasets: whole files of each chosen tile."""
    datasets = {}
    for task in args.tasks:
        for ratio in args.split_ratios:
            selection, chosen = split_selection(tiles, task, ratio, args.buckets(), args.split_protocol,
                                                args.split_seed)
            if args.regions:
                selection["regions"] = list(args.regions)
            for split in ("train", "val"):
                units = [{"tile": tile.to_json(), "rows": None} for tile in chosen[split]]
                datasets[f"{subset_name(task, 'p', ratio)}/{split}"] = {"split": split, "units": units,
                                                                    "selection": selection}
    return datasets


def describe_data(args: PhilEOBenchArgs, tiles: list[TileFiles]) -> dict:
    """Patch size (from the s2 files), ground sample distance and the index-file name of the build."""
    patch_size = common_patch_size(tiles) or PATCH_SIZE
    gsd, why = args.resolved_gsd()
    name = default_indices_name(patch_size, gsd) if args.indices_name == "auto" else args.indices_name
    log.info("%d x %d px patches at %d m (%s)", patch_size, patch_size, gsd, why)
    return {"patch_size": patch_size, "gsd": gsd, "gsd_from": why, "indices_name": name}


def make_plan(args: PhilEOBenchArgs, workers: int) -> dict:
    """List the input, select the n-shot patches, save plan.json and then build.json."""
    output = Path(args.output)
    found, ignored = scan_inputs(args.inputs)
    if not found:
        raise InputError(f"--input {', '.join(args.inputs)}: no {{region}}_{{tile}}_{{split}}_{{kind}}.npy files")
    tiles, file_rejects = group_tiles(found)
    data = describe_data(args, tiles)
    if args.tasks:
        datasets, scales = _nshot_datasets(args, tiles, workers, data)
        datasets = ({"test": {"split": "test", "units": _full_units(tiles, "test"), "selection": None}} | datasets
                    | _split_datasets(args, tiles))
    else:
        datasets = {split: {"split": split, "units": _full_units(tiles, split), "selection": None} for split in SPLITS}
        scales = {}
    for dataset in datasets.values():
        dataset["rejected"] = [{k: v for k, v in r.items() if k != "split"} for r in file_rejects
                               if r["split"] == dataset["split"]]
        for unit in dataset["units"]:
            unit["scales"] = {task: scales[ref["display"]] for task, ref in unit["tile"]["labels"].items()
                              if ref["display"] in scales}
    plan = {"datasets": datasets, "ignored_files": ignored}
    atomic_write(output / PHILEO_BENCH_PLAN, lambda p: p.write_text(json.dumps(plan)))
    info = {"schema": SCHEMA_VERSION, "source": SOURCE, "tool_version": __version__, "args": args.defining(),
            "datasets": list(datasets), "patches": sum(t.rows for t in tiles), **data}
    atomic_write(output / BUILD_INFO, lambda p: p.write_text(json.dumps(info, indent=1)))
    log.info("planned %d datasets from %d s2 files (%d files rejected, %d ignored)", len(datasets), len(tiles),
             len(file_rejects), len(ignored))
    return info


def finalize_dataset(directory: Path, name: str, dataset: dict, info: dict) -> dict:
    """Write index, rejected list and manifest (last) of one dataset from its units' files."""
    describe = {"dataset": name, "split": dataset["split"], "patch_size": info["patch_size"], "gsd": info["gsd"]}
    return finalize(directory, {"source": SOURCE, "args": info["args"]}, len(dataset["units"]), dataset["rejected"],
                    0, schema=phileo_bench_index_schema(), describe=describe, selection=dataset["selection"])


def build_phileo_bench(args: PhilEOBenchArgs, workers: int = 1, overwrite: bool = False) -> PhilEOBenchSummary:
    """Build (or resume) the PhilEO Bench datasets; returns the summary. Raises InputError on bad input."""
    check_codec_environment()
    with output_lock(Path(args.output)):
        return _build_phileo_bench(args, workers, overwrite)


def _build_phileo_bench(args: PhilEOBenchArgs, workers: int, overwrite: bool) -> PhilEOBenchSummary:
    started = time.monotonic()
    output = Path(args.output)
    info = prepare_output(args, overwrite) or make_plan(args, workers)
    datasets = json.loads((output / PHILEO_BENCH_PLAN).read_text())["datasets"]
    options = PhilEOBenchUnitOptions(args.shard_size, args.clevel, args.density_scale, info["patch_size"])
    jobs = []
    for name, dataset in datasets.items():
        directory = output / name
        (directory / SHARDS_DIR).mkdir(parents=True, exist_ok=True)
        (directory / UNITS_DIR).mkdir(exist_ok=True)
        jobs += [(str(directory), number, unit, options) for number, unit in enumerate(dataset["units"])
                 if not unit_stats_path(directory, number).is_file()]
    summary = PhilEOBenchSummary(datasets=len(datasets))
    total = sum(job[2]["tile"]["rows"] if job[2]["rows"] is None else len(job[2]["rows"]) for job in jobs)
    log.info("%d units to build (%d patches)", len(jobs), total)
    with tqdm(total=total, unit="patch", desc="build", dynamic_ncols=True) as bar:
        for number, result in run_jobs(build_phileo_bench_unit, jobs, workers, bar.update):
            if "traceback" in result:
                failed = {"unit": f"{jobs[number][0]}#{jobs[number][1]}"} | result
                log.error("unit %s failed: %s\n%s", failed["unit"], result["error"], result["traceback"])
                summary.failed_units.append(failed)
    if summary.failed_units:
        log.error("%d unit(s) failed; rerun the same command to retry them", len(summary.failed_units))
    else:
        for name, dataset in datasets.items():
            totals = finalize_dataset(output / name, name, dataset, info)["totals"]
            summary.written += totals["samples"]
            summary.rejected += totals["rejected"]
            summary.shards += totals["shards"]
            summary.bytes_out += totals["bytes"]
    summary.seconds = time.monotonic() - started
    return summary
