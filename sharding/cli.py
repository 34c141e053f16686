"""`phileo-shard` command line: parses flags and wires planner, writer and distributor."""

from __future__ import annotations

import errno
import logging
import sys

import click

from phileo.cli import output_option
from phileo.urls import redact_text
from sharding.build.driver import BuildArgs
from sharding.build.fasttom import FastTomRules
from sharding.errors import InputError
from sharding.phileo_bench.driver import PhilEOBenchArgs
from sharding.phileo_bench.nshot import DENSITY_SCALES
from sharding.phileo_bench.split import SPLIT_PROTOCOLS


def _parse_bbox(value: str | None) -> tuple[float, float, float, float] | None:
    if value is None:
        return None
    try:
        west, south, east, north = (float(part) for part in value.split(","))
    except ValueError as error:
        raise InputError(f"--bbox {value!r}: expected four numbers W,S,E,N") from error
    return west, south, east, north


def _format_size(size: int) -> str:
    """The largest decimal unit that divides `size`: 1000000000 -> 1GB (the inverse of _parse_size)."""
    for suffix, factor in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if size % factor == 0:
            return f"{size // factor}{suffix}"
    return str(size)


def _parse_size(value: str) -> int:
    """`1GB`, `500MB`, `64KB`, `1000000` -> bytes (decimal units)."""
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "B": 1}
    text = value.strip().upper()
    for suffix, factor in units.items():
        if text.endswith(suffix):
            try:
                return int(float(text[: -len(suffix)]) * factor)
            except ValueError:
                break
    try:
        return int(text)
    except ValueError as error:
        raise InputError(f"--shard-size {value!r}: expected bytes, e.g. 1GB, 500MB or 1000000") from error


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def main(verbose: bool) -> None:
    """Convert MajorTOM / FastTOM / PhilEO Bench into WebDataset shards."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("numexpr").setLevel(logging.WARNING)  # blosc2 imports it; its INFO line is noise
    if not verbose:  # huggingface_hub's HTTP client logs every request (each hf:// ranged read) at INFO
        for client in ("httpx", "httpx2"):
            logging.getLogger(client).setLevel(logging.WARNING)


# the machine's state, not a bug: a full disk or quota, a read-only or forbidden path
_ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def run_or_exit(function, *args, **kwargs):
    """Bad user input -> one line on stderr and exit 2; a remote source that stays unavailable -> exit 1."""
    from sharding.sources.remote import RemoteUnavailable, scrub

    try:
        return function(*args, **kwargs)
    except InputError as error:
        click.echo(f"error: {redact_text(str(error))}", err=True)
        sys.exit(2)
    except RemoteUnavailable as error:  # nothing was recorded for what failed: a rerun retries it
        click.echo(f"error: {redact_text(scrub(str(error)))}; rerun the same command when it is back", err=True)
        sys.exit(1)
    except OSError as error:
        if error.errno not in _ENVIRONMENT_ERRNOS:
            raise
        click.echo(f"error: {error.filename or 'output'}: {error.strerror}; fix that and rerun the same command "
                   "(what is finished is kept)", err=True)
        sys.exit(1)


@main.command()
@click.option("--source", type=click.Choice(["majortom", "fasttom", "geotiff", "phileo-bench"]), default="majortom",
              show_default=True, help="fasttom: MajorTOM input, one 516 px quadrant per tile by FastTOM's rules. "
              "geotiff: a directory of per-sample folders (B*.tif, cloud_mask.tif, optional metadata.json).")
@click.option("--input", "input_path", multiple=True,
              help="majortom: images/*.parquet dir, one .parquet, or extracted layout; or s3://bucket/prefix, "
                   "hf://datasets/Major-TOM/Core-S2L2A, a parquet URL, or a .txt/.json list of parquet URLs. "
                   "phileo-bench: a directory of .npy files or zips, or .zip / .zip.001 files (repeatable).")
@click.option("--output", required=True, help="Output dataset directory, or s3://bucket/prefix.")
@click.option("--metadata", help="majortom: plan from this metadata.parquet (path or URL): filter its rows, then "
                                 "read only the selected row groups; --input, if given, is the root its "
                                 "parquet_url paths are rebased onto.")
@click.option("--shard-size", default=_format_size(BuildArgs.shard_size), show_default=True,
              help="Target shard size (1GB, 500MB, bytes).")
@click.option("--max-cloud", type=float, help="Keep tiles with cloud cover <= this percentage.")
@click.option("--max-nodata", type=float, help="Keep tiles with no-data fraction <= this (0..1).")
@click.option("--bbox", help="W,S,E,N in degrees: keep tiles whose centre lies inside.")
@click.option("--start", help="Keep tiles acquired on or after this date (YYYY-MM-DD).")
@click.option("--end", help="Keep tiles acquired on or before this date (YYYY-MM-DD).")
@click.option("--grid-cells", "grid_cells_file", help="File with one grid cell per line to keep.")
@click.option("--limit", type=int, help="Keep at most N tiles (the first N in source order).")
@click.option("--mix-files", default=BuildArgs.mix_groups, show_default=True,
              help="Source files mixed into each shard.")
@click.option("--seed", type=int, help=f"majortom: seed of the mixing plan (default {BuildArgs.seed}). phileo-bench: "
                                     f"seed of the n-shot selection (default {PhilEOBenchArgs.seed}, the benchmark's).")
@click.option("--clevel", default=BuildArgs.clevel, show_default=True,
              help="Blosc2 level (1 = zstd 1; 5 = zstd 9, 4x slower).")
@click.option("--thumbnails", is_flag=True, help="Store a 128 px JPEG preview per sample.")
@click.option("--label", "labels", multiple=True, metavar="NAME=RASTER[:nearest|average]",
              help="Co-register a static raster (any CRS, read by windows) onto each tile as label_NAME; "
                   "repeatable. Default resampling: average for buildings, else nearest.")
@click.option("--workers", default=1, show_default=True, help="Worker processes (--executor ray: CPUs of the local "
                                                              "cluster started when there is no --ray-address).")
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="majortom: run work units on a local process pool or as Ray tasks.")
@click.option("--ray-address", help="majortom, --executor ray: address of an existing Ray cluster "
                                    "(default: start a local one).")
@click.option("--num-nodes", type=int, help="majortom: static multi-node build (SLURM): build only --node-rank's "
                                           "share of the units, then run `phileo-shard merge`.")
@click.option("--node-rank", type=int, help="majortom, with --num-nodes: this node's rank, 0..num-nodes-1.")
@click.option("--overwrite", is_flag=True, help="Delete a previous build in --output and start over.")
@click.option("--strict", is_flag=True, help="Exit non-zero if any row was rejected.")
@click.option("--allow-empty", is_flag=True, help="Write a dataset even when no tile passes (else an error).")
@click.option("--dry-run", is_flag=True, help="majortom: plan (tiles kept, dropped by each filter, units, bytes, "
                                            "each node's share) and stop; the same command without it builds.")
@click.option("--task", help="phileo-bench n-shot: roads, buildings and/or landcover, comma-separated.")
@click.option("--n-shot", "n_shot", help="phileo-bench n-shot: patches per region bucket, e.g. 50,100,500.")
@click.option("--indices", help="phileo-bench n-shot: directory of the benchmark's indices_*_{name}_{task}_{n}.json "
                                "files, used instead of the seeded selection.")
@click.option("--indices-name", default=PhilEOBenchArgs.indices_name, show_default=True,
              help="phileo-bench: {name} of --indices files; auto: 128_10M for 128 px 10 m patches, else "
                   "{size}_{gsd}m (224_30m for the HLS set).")
@click.option("--split-ratio", "split_ratio", help="phileo-bench: fractions of each bucket's train files (whole "
                                                   "files, the benchmark's protocol_split), e.g. 0.1,0.5,1.")
@click.option("--split-protocol", type=click.Choice(SPLIT_PROTOCOLS), default=PhilEOBenchArgs.split_protocol,
              show_default=True, help="phileo-bench --split-ratio: fixed = every sub-region of a bucket, the "
                                      "closest file kept; bench = the benchmark's file choice exactly.")
@click.option("--split-seed", type=int, default=PhilEOBenchArgs.split_seed, show_default=True,
              help="phileo-bench --split-ratio: seed of the file shuffle (the benchmark's np.random.seed).")
@click.option("--regions", help="phileo-bench: region buckets of the --n-shot/--split-ratio train and val sets, "
                                "comma-separated (europe, east-africa, ...); the test set keeps every region.")
@click.option("--gsd", type=click.Choice(["10", "30"]), help="phileo-bench: ground sample distance in metres "
                                                             "recorded with the data [default: 30 when an input path "
                                                             "names HLS or 30m, else 10].")
@click.option("--min-clear", type=float, default=FastTomRules.min_clear, show_default=True,
              help="fasttom: drop tiles whose clearest quadrant has a smaller cloud-free fraction.")
@click.option("--max-water", type=float, default=FastTomRules.max_water, show_default=True,
              help="fasttom: drop tiles whose quadrant has a larger water fraction (needs --label water=RASTER).")
@click.option("--density-scale", type=click.Choice(DENSITY_SCALES), default=PhilEOBenchArgs.density_scale,
              show_default=True,
              help="phileo-bench: divisor of roads/buildings labels to get a 0..1 density; auto = 100 when a "
                   "label file's maximum exceeds 1.")
def build(input_path: tuple[str, ...], output: str, shard_size: str, grid_cells_file: str | None, mix_files: int,
          workers: int, overwrite: bool, strict: bool, source: str, **options) -> None:
    """Build WebDataset shards from a source dataset (resumable: rerun the same command)."""

    def prepare_and_run():
        _check_options_for_source(source)
        if workers < 1:
            raise InputError(f"--workers {workers}: expected at least 1")
        if not input_path and (source == "phileo-bench" or not options["metadata"]):
            raise InputError("--input: required (majortom: unless --metadata is given)")
        if source == "phileo-bench":
            return _run_phileo_bench_build(input_path, output, shard_size, workers, overwrite, options)
        # majortom takes one input; as before --input became repeatable, the last one given wins
        return _run_majortom_build(input_path[-1] if input_path else None, output, shard_size, grid_cells_file,
                                   mix_files, workers, overwrite, options, source)

    summary = run_or_exit(prepare_and_run)
    click.echo(summary.line())
    if summary.failed_units:
        first = summary.failed_units[0]
        click.echo(f"error: {len(summary.failed_units)} unit(s) failed (unit {first['unit']}: {first['error']}); "
                   "rerun the same command to retry them", err=True)
        sys.exit(1)
    if strict and summary.rejected:
        click.echo(f"error: --strict: {summary.rejected} row(s) rejected, see {output}/rejected.jsonl", err=True)
        sys.exit(1)


_MAJORTOM_ONLY = ("allow_empty", "dry_run", "max_cloud", "max_nodata", "bbox", "start", "end", "grid_cells_file",
                  "limit", "mix_files", "thumbnails", "labels", "executor", "ray_address", "num_nodes", "node_rank")
_BENCH_ONLY = ("task", "n_shot", "indices", "indices_name", "density_scale", "split_ratio", "split_protocol",
               "split_seed", "regions", "gsd")
_FASTTOM_ONLY = ("min_clear", "max_water")


def _check_options_for_source(source: str) -> None:
    """Options of the other source given on the command line are a one-line error."""
    context = click.get_current_context()
    explicit = [param for param in context.command.params
                if context.get_parameter_source(param.name) not in (None, click.core.ParameterSource.DEFAULT)]
    other = {"majortom": _BENCH_ONLY + _FASTTOM_ONLY, "geotiff": _BENCH_ONLY + _FASTTOM_ONLY + ("metadata",),
             "fasttom": _BENCH_ONLY}.get(source,
                                                                                _MAJORTOM_ONLY + _FASTTOM_ONLY)
    for param in explicit:
        if param.name in other:
            raise InputError(f"{param.opts[0]} is not used with --source {source}")


def _split_list(value: str | None, flag: str, convert=str) -> tuple:
    if not value:
        return ()
    try:
        return tuple(convert(part.strip()) for part in value.split(",") if part.strip())
    except ValueError as error:
        raise InputError(f"{flag} {value!r}: expected a comma-separated list of numbers") from error


def _run_majortom_build(input_path: str | None, output: str, shard_size: str, grid_cells_file: str | None,
                        mix_files: int, workers: int, overwrite: bool, options: dict, source: str = "majortom"):
    from sharding.build.driver import build as run_build
    from sharding.build.fasttom import WATER_LABEL
    from sharding.build.labels import parse_label_spec
    from sharding.build.nodes import distributed_kwargs
    from sharding.build.plan import Filters, read_grid_cells_file
    from sharding.sources.remote import hide_credentials

    if "@" in output.split("://", 1)[-1].split("/", 1)[0] and output.startswith("s3://"):
        raise InputError(f"--output {hide_credentials(output)}: S3 credentials go in the AWS environment "
                         "(AWS_ACCESS_KEY_ID, ...), never in the URL")
    input_path = hide_credentials(input_path) if input_path else input_path  # stored and logged redacted
    options["metadata"] = hide_credentials(options["metadata"]) if options["metadata"] else None
    grid_cells = read_grid_cells_file(grid_cells_file) if grid_cells_file else None
    filters = Filters(max_cloud=options["max_cloud"], max_nodata=options["max_nodata"],
                      bbox=_parse_bbox(options["bbox"]), start=options["start"], end=options["end"],
                      grid_cells=grid_cells, limit=options["limit"])
    labels = tuple(parse_label_spec(text) for text in options["labels"])
    fasttom = source == "fasttom"
    rules = FastTomRules(min_clear=options["min_clear"], max_water=options["max_water"]) if fasttom else None
    if rules and rules.max_water < 1 and WATER_LABEL not in {spec.name for spec in labels}:
        raise InputError("--source fasttom: the water rule needs --label water=RASTER (or --max-water 1 to skip it)")
    args = BuildArgs(input=input_path, output=output, filters=filters, shard_size=_parse_size(shard_size),
                     mix_groups=mix_files, seed=BuildArgs.seed if options["seed"] is None else options["seed"],
                     clevel=options["clevel"], thumbnails=options["thumbnails"], labels=labels, fasttom=rules,
                     metadata=options["metadata"], tile_source="geotiff" if source == "geotiff" else "majortom")
    if output.startswith("s3://"):  # staged locally, published as units complete (sharding/build/remote_output.py)
        from sharding.build.driver import build_to_remote

        if options.get("num_nodes"):
            raise InputError(f"--output {output}: --num-nodes with an s3:// output is not supported yet")
        return build_to_remote(args, workers=workers, overwrite=overwrite, allow_empty=options["allow_empty"],
                               dry_run=options["dry_run"], **distributed_kwargs(options, overwrite))
    return run_build(args, workers=workers, overwrite=overwrite, allow_empty=options["allow_empty"],
                     dry_run=options["dry_run"], **distributed_kwargs(options, overwrite))


def _run_phileo_bench_build(inputs: tuple[str, ...], output: str, shard_size: str, workers: int, overwrite: bool,
                     options: dict):
    from sharding.phileo_bench.driver import build_phileo_bench

    seed = PhilEOBenchArgs.seed if options["seed"] is None else options["seed"]
    args = PhilEOBenchArgs(inputs=inputs, output=output, tasks=_split_list(options["task"], "--task"),
                           n_shots=_split_list(options["n_shot"], "--n-shot", int), seed=seed,
                           indices=options["indices"], indices_name=options["indices_name"],
                           density_scale=options["density_scale"], shard_size=_parse_size(shard_size),
                           clevel=options["clevel"], regions=_split_list(options["regions"], "--regions"),
                           split_ratios=_split_list(options["split_ratio"], "--split-ratio", float),
                           split_protocol=options["split_protocol"], split_seed=options["split_seed"],
                           gsd=int(options["gsd"]) if options["gsd"] else None)
    return build_phileo_bench(args, workers=workers, overwrite=overwrite)


DATASET_HELP = "DATASET: a local directory, s3://bucket/prefix, http(s)://host/path or hf://datasets/org/name[/path]."


@main.command(epilog=DATASET_HELP)
@click.argument("dataset")
@click.option("--no-pixels", is_flag=True, help="Check counts, sizes, tar offsets against the index and sha256 "
                                                "only; decode no member.")
def verify(dataset: str, no_pixels: bool) -> None:
    """Re-read every shard once: checksums, counts, decodable members, index rows."""
    from sharding.dataset.verify import verify_dataset

    problems, samples = run_or_exit(verify_dataset, dataset, pixels=not no_pixels)
    if problems:
        click.echo(f"error: {problems[0]}" + (f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""),
                   err=True)
        sys.exit(1)
    click.echo(f"ok: {samples} samples verified in {redact_text(dataset)}" + (" (no pixels)" if no_pixels else ""))


@main.command(epilog="PATH: a dataset (a local directory, s3://bucket/prefix, http(s)://host/path or "
                     "hf://datasets/org/name[/path]) or one .tar shard, local or at such a URL.")
@click.argument("path")
@click.option("--max-samples", default=8, show_default=True)
@click.option("--preview", help="Write an RGB preview PNG with cloud mask outlines here.")
def inspect(path: str, max_samples: int, preview: str | None) -> None:
    """Per-sample summary (key, time, location, cloud, band min/max/mean) of a dataset or shard."""
    from sharding.dataset.inspect_cmd import BadData, iter_samples, save_preview, summarize

    def run() -> list[BadData]:
        samples, bad = [], []
        for sample in iter_samples(path, max_samples):
            if isinstance(sample, BadData):
                bad.append(sample)
                click.echo(f"bad: {sample.where}: {sample.reason}")
                continue
            click.echo(summarize(sample))
            if preview:
                samples.append(sample)
        if preview and samples:
            save_preview(samples, preview)
            click.echo(f"preview of {len(samples)} samples written to {preview}")
        return bad

    bad = run_or_exit(run)
    if bad:
        click.echo(f"error: {len(bad)} bad sample(s) or shard(s) in {path} (first: {bad[0].where}: {bad[0].reason})",
                   err=True)
        sys.exit(1)


@main.command(epilog="SOURCE: " + DATASET_HELP.split(": ", 1)[1] + " The output is always a local directory.")
@click.argument("source")
@click.option("--output", required=True, help="Output dataset directory (local).")
@click.option("--where", help="Condition on index columns, e.g. \"cloud_cover < 10 and centre_lat > 0\" "
                              "(comparisons, in (...), and/or/not, parentheses, numbers, quoted strings).")
@click.option("--bbox", help="W,S,E,N in degrees: keep samples whose centre lies inside.")
@click.option("--start", help="Keep samples acquired on or after this ISO date/time.")
@click.option("--end", help="Keep samples acquired on or before this ISO date/time (a date: that whole day).")
@click.option("--shard-size", default=_format_size(BuildArgs.shard_size), show_default=True,
              help="Target shard size (1GB, 500MB, bytes).")
@click.option("--overwrite", is_flag=True, help="Replace a dataset already in --output.")
def subset(source: str, output: str, where: str | None, bbox: str | None, start: str | None, end: str | None,
           shard_size: str, overwrite: bool) -> None:
    """Copy the samples of SOURCE that match a query into a new dataset (tar bytes unchanged)."""
    from sharding.dataset.subset import SubsetArgs
    from sharding.dataset.subset import subset as run_subset

    def run():
        args = SubsetArgs(source, output, where, _parse_bbox(bbox), start, end, _parse_size(shard_size))
        return run_subset(args, overwrite)

    click.echo(run_or_exit(run).line())


@main.command(epilog=DATASET_HELP + " The outputs are always local directories.")
@click.argument("dataset")
@click.option("--output-train", required=True, help="Output dataset directory of the training samples (local).")
@click.option("--output-val", required=True, help="Output dataset directory of the validation samples (local).")
@click.option("--val-fraction", default=0.01, show_default=True, help="About this fraction of samples for val.")
@click.option("--block-km", default=100.0, show_default=True, help="Side of the square blocks held out whole.")
@click.option("--buffer-km", default=12.0, show_default=True,
              help="Drop samples whose centre is within this of a train/val block boundary (one grid cell plus "
                   "the tile's overhang: overlapping tiles never straddle it).")
@click.option("--seed", default=0, show_default=True, help="Seed of the choice of val blocks.")
@click.option("--shard-size", default=_format_size(BuildArgs.shard_size), show_default=True,
              help="Target shard size (1GB, 500MB, bytes).")
@click.option("--overwrite", is_flag=True, help="Replace datasets already in the outputs.")
def split(dataset: str, output_train: str, output_val: str, val_fraction: float, block_km: float, buffer_km: float,
          seed: int, shard_size: str, overwrite: bool) -> None:
    """Spatial train/val hold-out of whole blocks, with a buffer at train/val block boundaries."""
    from sharding.dataset.split import SplitArgs
    from sharding.dataset.split import split as run_split

    def run():
        args = SplitArgs(dataset, output_train, output_val, val_fraction, block_km, buffer_km, seed,
                         _parse_size(shard_size))
        return run_split(args, overwrite)

    click.echo(run_or_exit(run).line())


@main.command(epilog=DATASET_HELP)
@click.argument("dataset")
@output_option("PNG to write (local); the counts go to the same name with .json.", dest="out")
def coverage(dataset: str, out: str) -> None:
    """World map of sample centres, counts per latitude band, acquisition months and cloud cover."""
    from sharding.dataset.coverage import coverage_map

    counts, png, json_path = run_or_exit(coverage_map, dataset, out)
    click.echo(counts.line(png, json_path))


@main.command()
@click.argument("output")
def merge(output: str) -> None:
    """Finish a --num-nodes build: check every node's units are complete, then write index and manifest."""
    from sharding.build.merge import merge as run_merge

    click.echo(run_or_exit(run_merge, output).line())


if __name__ == "__main__":
    main()
