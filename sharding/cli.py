"""`phileo-shard` command line: parses flags and wires planner, writer and distributor."""

from __future__ import annotations

import logging
import sys

import click

from sharding.errors import InputError


def _parse_bbox(value: str | None) -> tuple[float, float, float, float] | None:
    if value is None:
        return None
    try:
        west, south, east, north = (float(part) for part in value.split(","))
    except ValueError as error:
        raise InputError(f"--bbox {value!r}: expected four numbers W,S,E,N") from error
    return west, south, east, north


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


def run_or_exit(function, *args, **kwargs):
    """Bad user input -> one line on stderr and exit 2, no traceback."""
    try:
        return function(*args, **kwargs)
    except InputError as error:
        click.echo(f"error: {error}", err=True)
        sys.exit(2)


@main.command()
@click.option("--source", type=click.Choice(["majortom"]), default="majortom", show_default=True)
@click.option("--input", "input_path", required=True, help="images/*.parquet dir, one .parquet, or extracted layout.")
@click.option("--output", required=True, help="Output dataset directory.")
@click.option("--shard-size", default="1GB", show_default=True, help="Target shard size (1GB, 500MB, bytes).")
@click.option("--max-cloud", type=float, help="Keep tiles with cloud cover <= this percentage.")
@click.option("--max-nodata", type=float, help="Keep tiles with no-data fraction <= this (0..1).")
@click.option("--bbox", help="W,S,E,N in degrees: keep tiles whose centre lies inside.")
@click.option("--start", help="Keep tiles acquired on or after this date (YYYY-MM-DD).")
@click.option("--end", help="Keep tiles acquired on or before this date (YYYY-MM-DD).")
@click.option("--grid-cells", "grid_cells_file", help="File with one grid cell per line to keep.")
@click.option("--limit", type=int, help="Keep at most N tiles (the first N in source order).")
@click.option("--mix-files", default=16, show_default=True, help="Source files mixed into each shard.")
@click.option("--seed", default=0, show_default=True, help="Seed of the mixing plan.")
@click.option("--clevel", default=1, show_default=True, help="Blosc2 level (1 = zstd 1; 5 = zstd 9, 4x slower).")
@click.option("--thumbnails", is_flag=True, help="Store a 128 px JPEG preview per sample.")
@click.option("--label", "labels", multiple=True, metavar="NAME=RASTER[:nearest|average]",
              help="Co-register a static raster (any CRS, read by windows) onto each tile as label_NAME; "
                   "repeatable. Default resampling: average for buildings, else nearest.")
@click.option("--workers", default=1, show_default=True, help="Worker processes.")
@click.option("--overwrite", is_flag=True, help="Delete a previous build in --output and start over.")
@click.option("--strict", is_flag=True, help="Exit non-zero if any row was rejected.")
def build(input_path: str, output: str, shard_size: str, grid_cells_file: str | None, mix_files: int,
          workers: int, overwrite: bool, strict: bool, source: str, **options) -> None:
    """Build WebDataset shards from a source dataset (resumable: rerun the same command)."""
    from sharding.build import BuildArgs
    from sharding.build import build as run_build
    from sharding.labels import parse_label_spec
    from sharding.plan import Filters, read_grid_cells_file

    def prepare_and_run():
        grid_cells = read_grid_cells_file(grid_cells_file) if grid_cells_file else None
        filters = Filters(options["max_cloud"], options["max_nodata"], _parse_bbox(options["bbox"]),
                          options["start"], options["end"], grid_cells, options["limit"])
        labels = tuple(parse_label_spec(text) for text in options["labels"])
        args = BuildArgs(input_path, output, filters, _parse_size(shard_size), mix_files, options["seed"],
                         options["clevel"], options["thumbnails"], labels)
        if workers < 1:
            raise InputError(f"--workers {workers}: expected at least 1")
        return run_build(args, workers=workers, overwrite=overwrite)

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


@main.command()
@click.argument("dataset")
def verify(dataset: str) -> None:
    """Re-read every shard: checksums, counts, decodable members, index rows."""
    from sharding.verify import verify_dataset

    problems, samples = run_or_exit(verify_dataset, dataset)
    if problems:
        click.echo(f"error: {problems[0]}" + (f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""),
                   err=True)
        sys.exit(1)
    click.echo(f"ok: {samples} samples verified in {dataset}")


@main.command()
@click.argument("path")
@click.option("--max-samples", default=8, show_default=True)
@click.option("--preview", help="Write an RGB preview PNG with cloud mask outlines here.")
def inspect(path: str, max_samples: int, preview: str | None) -> None:
    """Per-sample summary (key, time, location, cloud, band min/max/mean) of a dataset or shard."""
    from sharding.inspect_cmd import iter_samples, save_preview, summarize

    def run():
        samples = []
        for sample in iter_samples(path, max_samples):
            click.echo(summarize(sample))
            if preview:
                samples.append(sample)
        if preview:
            save_preview(samples, preview)
            click.echo(f"preview of {len(samples)} samples written to {preview}")

    run_or_exit(run)


if __name__ == "__main__":
    main()
