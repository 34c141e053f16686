"""`phileo-shard build --source phileo-bench`: PhilEO Bench downstream npy files -> datasets of shards.

Without n-shot: OUT/train, OUT/val, OUT/test. With `--task/--n-shot` (seeded, or `--indices`):
OUT/test (the full test split of every region) and OUT/{task}-n{n}/train|val holding only the
selected patches, the selection saved in their manifests. Each is a normal dataset directory
(shards/, units/, index.parquet, rejected.jsonl, manifest.json last). OUT/plan.json is the saved
plan (units, selections, density scales), OUT/build.json the arguments (written last when
planning, checked on resume). A unit is one s2 npy file of one output dataset.
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
from phileo.phileo_bench import REGRESSION_TASKS, SOURCE, SPLITS, TASKS
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
from sharding.phileo_bench.unit import PhilEOBenchUnitOptions, build_phileo_bench_unit, phileo_bench_index_schema
from sharding.sources.phileo_bench import TileFiles, group_tiles, scan_inputs

log = logging.getLogger(__name__)

_NSHOT_DIR = re.compile(r"^(" + "|".join(TASKS) + r")-n\d+$")


@dataclass(frozen=True)
class PhilEOBenchArgs:
    """The arguments that define a PhilEO Bench build: a rerun must repeat them exactly to resume."""

    inputs: tuple[str, ...]
    output: str
    tasks: tuple[str, ...] = ()
    n_shots: tuple[int, ...] = ()
    seed: int = DEFAULT_SEED
    indices: str | None = None
    indices_name: str = "128_10M"
    density_scale: str = "auto"
    shard_size: int = 1_000_000_000
    clevel: int = DEFAULT_CLEVEL

    def __post_init__(self) -> None:
        object.__setattr__(self, "inputs", tuple(self.inputs))
        object.__setattr__(self, "tasks", tuple(dict.fromkeys(self.tasks)))
        object.__setattr__(self, "n_shots", tuple(sorted(set(self.n_shots))))
        if not self.inputs:
            raise InputError("--input: give at least one directory, .zip or .zip.001 file")
        unknown = [task for task in self.tasks if task not in TASKS]
        if unknown:
            raise InputError(f"--task {unknown[0]!r}: expected one or more of {', '.join(TASKS)}")
        if bool(self.tasks) != bool(self.n_shots):
            raise InputError("--task and --n-shot go together: give both for n-shot datasets, or neither")
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

    def dataset_names(self) -> list[str]:
        if not self.tasks:
            return list(SPLITS)
        return ["test"] + [f"{task}-n{n}/{split}" for task in self.tasks for n in self.n_shots
                           for split in ("train", "val")]

    def defining(self) -> dict:
        """JSON of what the datasets depend on (not where they are written)."""
        args = asdict(self)
        args.pop("output")
        args["inputs"] = [str(Path(path).resolve()) for path in self.inputs]
        args["indices"] = str(Path(self.indices).resolve()) if self.indices else None
        args["tasks"], args["n_shots"] = list(self.tasks), list(self.n_shots)
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


def _scan_pools(pools: dict[str, dict[str, Pool]], task: str, mode: str, workers: int) -> dict[str, dict]:
    """{label file display: scan} over every file of the train and val pools (one streaming pass)."""
    files = {tile.labels[task].display: tile.labels[task]
             for by_bucket in pools.values() for pool in by_bucket.values() for tile in pool.tiles}
    refs = [files[display] for display in sorted(files)]
    scales = (1, 100) if mode == "auto" else tuple(sorted({1, int(mode)}))  # 1: the selection's raw means
    total = sum(tile.rows for by_bucket in pools.values() for pool in by_bucket.values() for tile in pool.tiles)
    scans = {}
    with tqdm(total=total, unit="patch", desc=f"{task} label means", dynamic_ncols=True) as bar:
        for number, result in run_jobs(scan_label_file, [(ref.to_json(), task, scales) for ref in refs], workers,
                                       bar.update):
            if "traceback" in result:
                raise RuntimeError(f"scanning {refs[number].display} failed: {result['error']}\n{result['traceback']}")
            if result["error"]:
                log.warning("%s: %s (its patches count as empty in the selection)", refs[number].display,
                            result["error"])
            scans[refs[number].display] = result
    return scans


def _nshot_datasets(args: PhilEOBenchArgs, tiles: list[TileFiles], workers: int) -> tuple[dict, dict[str, int]]:
    """({dataset name: dataset}, {label file: density scale}) of the n-shot datasets."""
    index_files = {(task, n): find_index_file(args.indices, args.indices_name, task, n)
                   for task in args.tasks for n in args.n_shots} if args.indices else {}
    datasets, scales = {}, {}
    for task in args.tasks:
        pools = {split: bucket_pools(tiles, task, split) for split in ("train", "val")}
        means = None
        if not args.indices and task in REGRESSION_TASKS:
            scans = _scan_pools(pools, task, args.density_scale, workers)
            scales |= {display: density_scale(scan["max"], args.density_scale)
                       for display, scan in scans.items() if not scan["error"]}
            means = {bucket: (pool_means(pool, task, scans),
                              pool_means(pools["val"].get(bucket, Pool()), task, scans))
                     for bucket, pool in pools["train"].items()}
        for n in args.n_shots:
            selection = make_selection(task, n, pools, seed=args.seed, index=index_files.get((task, n)), means=means)
            for split in ("train", "val"):
                rows = selected_rows(selection, pools, split)
                units = [{"tile": tile.to_json(), "rows": rows[tile.s2.display]}
                         for tile in tiles if tile.s2.display in rows]
                datasets[f"{task}-n{n}/{split}"] = {"split": split, "units": units, "selection": selection}
    return datasets, scales


def make_plan(args: PhilEOBenchArgs, workers: int) -> dict:
    """List the input, select the n-shot patches, save plan.json and then build.json."""
    output = Path(args.output)
    found, ignored = scan_inputs(args.inputs)
    if not found:
        raise InputError(f"--input {', '.join(args.inputs)}: no {{region}}_{{tile}}_{{split}}_{{kind}}.npy files")
    tiles, file_rejects = group_tiles(found)
    if args.tasks:
        datasets, scales = _nshot_datasets(args, tiles, workers)
        datasets = {"test": {"split": "test", "units": _full_units(tiles, "test"), "selection": None}} | datasets
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
            "datasets": list(datasets), "patches": sum(t.rows for t in tiles)}
    atomic_write(output / BUILD_INFO, lambda p: p.write_text(json.dumps(info, indent=1)))
    log.info("planned %d datasets from %d s2 files (%d files rejected, %d ignored)", len(datasets), len(tiles),
             len(file_rejects), len(ignored))
    return info


def finalize_dataset(directory: Path, name: str, dataset: dict, info: dict) -> dict:
    """Write index, rejected list and manifest (last) of one dataset from its units' files."""
    return finalize(directory, {"source": SOURCE, "args": info["args"]}, len(dataset["units"]), dataset["rejected"],
                    0, schema=phileo_bench_index_schema(), describe={"dataset": name, "split": dataset["split"]},
                    selection=dataset["selection"])


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
    options = PhilEOBenchUnitOptions(args.shard_size, args.clevel, args.density_scale)
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
