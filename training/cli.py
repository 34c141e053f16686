"""`phileo-train` command line: flags override the config dataclasses, nothing more."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator

import click

from phileo.cli import output_option
from phileo.urls import redact_text
from training.config import (
    CLASS_WEIGHTS,
    FINETUNE_TASKS,
    LR_SCHEDULERS,
    BadDataError,
    BenchConfig,
    CheckpointError,
    ConfigError,
    DataConfig,
    EmbedConfig,
    FinetuneDataConfig,
    FinetuneOptimConfig,
    FinetuneRunConfig,
    OptimConfig,
    PretrainConfig,
    RunConfig,
    TrainingDiverged,
)


def _default(config: type, name: str, **kwargs):
    """`--name` with the config dataclass's default: defaults are stated once, in training/config.py."""
    default = config.__dataclass_fields__[name].default
    return click.option("--" + name.replace("_", "-"), default=default, show_default=default is not None, **kwargs)


def _apply(function, options: list):
    for option in reversed(options):
        function = option(function)
    return function


def _data_options(function):
    return _apply(function, [
        click.option("--shards", required=True, help="manifest.json (path/URL), dataset dir, URL list or pattern."),
        _default(DataConfig, "crops_per_tile", help="Random crops cut from each tile."),
        _default(DataConfig, "crop_size"),
        _default(DataConfig, "batch_size", help="Crops per rank per micro-step."),
        _default(DataConfig, "num_workers", help="DataLoader workers per rank."),
        _default(DataConfig, "shuffle_buffer", help="Crops in each worker's buffer."),
        _default(DataConfig, "shards_in_parallel", help="Shards interleaved per worker."),
        _default(DataConfig, "max_bad_fraction", help="Fail past this unreadable share."),
    ])


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("numexpr").setLevel(logging.WARNING)


@contextlib.contextmanager
def _one_line_errors() -> Iterator[None]:
    """Bad input -> exit 2, a run that failed -> exit 1; one line on stderr each, no traceback."""
    from training.data.epoch import PlanError
    from training.data.shards import ShardSpecError

    try:
        yield
    except (ConfigError, ShardSpecError, PlanError, CheckpointError) as error:
        _fail(error)
    except (TrainingDiverged, BadDataError) as error:
        _fail(error, code=1)


def _fail(error: Exception, code: int = 2) -> None:
    """One line on stderr; exit 2 for bad input, 1 for a run that failed."""
    text = str(error).strip()
    if "Original Traceback" in text:  # re-raised from a DataLoader worker: the worker's own message
        text = text.splitlines()[-1].split(": ", 1)[-1]
    click.echo(f"error: {redact_text(' '.join(text.split()))}", err=True)
    sys.exit(code)


@click.group()
def main() -> None:
    """Pretrain and fine-tune PhilEO geospatial foundation models on phileo-shard datasets."""


@main.command()
@_data_options
@output_option("Run directory (config, metrics, checkpoints).", dest="out")
@_default(RunConfig, "model")
@_default(RunConfig, "epochs", type=int)
@_default(RunConfig, "steps", type=int, help="Optimizer steps (overrides --epochs).")
@_default(RunConfig, "seed")
@_default(OptimConfig, "lr", type=float, help="Peak learning rate [default: the original's, x sqrt(world size): "
          "1e-4 for the U-Nets, 3e-5 for the ViTs].")
@_default(OptimConfig, "min_lr", type=float, help="Final learning rate [default: 1e-6 U-Nets, 1e-8 ViTs].")
@_default(OptimConfig, "weight_decay")
@_default(OptimConfig, "warmup_steps")
@_default(OptimConfig, "grad_clip")
@_default(OptimConfig, "grad_accum")
@_default(RunConfig, "ckpt_every", help="Checkpoint every N optimizer steps.")
@_default(RunConfig, "keep_checkpoints")
@_default(RunConfig, "log_every")
@_default(RunConfig, "record_keys",
          help="Directory: each rank appends 'KEY CROP' (tile key, crop index) per trained crop to rank{r}.txt.")
@click.option("--resume", is_flag=True, help="Continue from the newest checkpoint in --output.")
@click.option("--amp/--no-amp", default=RunConfig.amp, show_default=True, help="bf16 autocast where supported.")
@_default(RunConfig, "strategy", type=click.Choice(["ddp", "fsdp"]),
          help="fsdp: FSDP2 per block (bf16 params, fp32 reduce) for the 200M/300M models.")
@click.option("--activation-checkpointing", is_flag=True, help="Recompute blocks in backward to save memory.")
def pretrain(**flags) -> None:
    """Pretrain a model by streaming shards (launch with torchrun for several ranks)."""
    from training.pretrain import pretrain as run_pretrain

    _setup_logging()
    with _one_line_errors():
        _check_model(flags["model"])
        run_pretrain(PretrainConfig(_pick(RunConfig, flags), _pick(DataConfig, flags), _pick(OptimConfig, flags)))


@main.command("bench-data")
@_data_options
@_default(BenchConfig, "seconds", type=float,
          help="Wall time to stream after the first batch (start-up is timed apart), looping epochs.")
@_default(BenchConfig, "seed")
def bench_data(seconds: float, seed: int, **flags) -> None:
    """Time the training data pipeline alone (no model): crops/s, tiles/s, MB/s, batch diversity, peak RSS."""
    from training.bench_data import format_report, run_bench

    _setup_logging()
    with _one_line_errors():
        result = run_bench(BenchConfig(DataConfig(**flags), seconds, seed))
    for line in format_report(result):
        click.echo(line)


@main.command("plan")
@click.option("--shards", required=True, help="manifest.json (path/URL), dataset dir, URL list or pattern.")
@click.option("--world-size", type=int, required=True, help="Ranks of the run to plan (e.g. 512).")
@_default(DataConfig, "num_workers", help="DataLoader workers per rank.")
@_default(DataConfig, "batch_size", help="Crops per rank per micro-step.")
@_default(DataConfig, "crops_per_tile")
@_default(OptimConfig, "grad_accum")
@click.option("--epoch", default=0, show_default=True)
@_default(RunConfig, "seed")
def plan(**flags) -> None:
    """What an epoch will do on a cluster (the trainer's own planner): steps, crops, drops, shards per worker."""
    from training.plan_report import PlanRequest, plan_report

    with _one_line_errors():
        lines = plan_report(PlanRequest(**flags))
    for line in lines:
        click.echo(line)


def _finetune_options(function):
    return _apply(function, [
        click.option("--task", required=True, type=click.Choice(FINETUNE_TASKS),
                     help="Dense: roads / buildings (density), landcover (11 classes). Per patch: "
                          "landcover-classification, buildings-classification, roads-classification (the bench's "
                          "lc_classification, building_classification, roads_classification; labels computed "
                          "from the dense ones, docs/format.md)."),
        output_option("Run directory (config, history, best.pt, metrics.json).", dest="out"),
        _default(FinetuneRunConfig, "model"),
        _default(FinetuneRunConfig, "mode", type=click.Choice(["frozen", "full"]),
                 help="frozen: train decoder/head on a frozen pretrained encoder."),
        click.option("--model-arg", "model_arg", multiple=True, metavar="KEY=VALUE",
                     help="Repeatable: a factory override of the model (e.g. bands=bench); VALUE is a JSON "
                          "int/float/bool/null, else a string."),
        _default(FinetuneRunConfig, "class_weights", type=click.Choice(CLASS_WEIGHTS),
                 help="Classification loss weights: the bench's (its class frequencies) or none."),
        _default(FinetuneOptimConfig, "epochs"),
        _default(FinetuneOptimConfig, "lr", type=float,
                 help="Learning rate after warmup [default: 1e-3 x sqrt(world size)]."),
        _default(FinetuneOptimConfig, "weight_decay"),
        _default(FinetuneOptimConfig, "warmup_epochs", help="Epochs of x10 warmup (0: none)."),
        _default(FinetuneOptimConfig, "warmup_gamma"),
        _default(FinetuneOptimConfig, "warmup_lr_start", type=float,
                 help="Warmup's first lr, rising geometrically to --lr [default: lr / warmup-gamma**warmup-epochs]."),
        _default(FinetuneOptimConfig, "lr_scheduler", type=click.Choice(LR_SCHEDULERS)),
        _default(FinetuneOptimConfig, "min_lr"),
        _default(FinetuneOptimConfig, "es_patience", help="Early stop after N epochs without a val-loss improvement."),
        _default(FinetuneOptimConfig, "es_delta"),
        _default(FinetuneDataConfig, "batch_size", help="Patches per rank per step."),
        _default(FinetuneDataConfig, "num_workers", help="DataLoader workers per rank."),
        _default(FinetuneDataConfig, "shuffle_buffer"),
        click.option("--augmentations", is_flag=True,
                     help="The bench's training augmentations: rotation, mirror, multiplicative noise, p=0.2 each."),
        _default(FinetuneRunConfig, "seed"),
        click.option("--amp/--no-amp", default=FinetuneRunConfig.amp, show_default=True, help="bf16 autocast on CUDA."),
        _default(FinetuneRunConfig, "previews", help="Test patches drawn in previews.png."),
        click.option("--vis-val", is_flag=True, help="Draw validation patches every epoch: val_images/val_EPOCH.png."),
    ])


def _pick(config: type, flags: dict, **values):
    """`config(...)` from the flags named like its fields (and `values`); the rest keep their defaults."""
    return config(**{k: v for k, v in flags.items() if k in config.__dataclass_fields__} | values)


def _finetune_config(flags: dict, shards: str, val_shards: str, test_shards: str | None, init: str | None):
    from training.config import FinetuneConfig, parse_model_args

    run = _pick(FinetuneRunConfig, flags, init=init, model_args=parse_model_args(flags.get("model_arg", ())))
    data = _pick(FinetuneDataConfig, flags, shards=shards, val_shards=val_shards, test_shards=test_shards)
    return FinetuneConfig(run, data, _pick(FinetuneOptimConfig, flags))


def _check_model(name: str) -> None:
    from phileo.models import list_models

    if name not in list_models():
        raise ConfigError(f"--model {name}: unknown; choose one of {', '.join(list_models())}")


@main.command()
@_finetune_options
@click.option("--shards", required=True, help="Training dataset (e.g. OUT/roads-n50/train).")
@click.option("--val-shards", required=True, help="Validation dataset (early stopping).")
@click.option("--test-shards", help="Test dataset (e.g. OUT/test): metrics.json, confusion matrix, previews.")
@click.option("--init", help="Pretraining checkpoint (file or sharded dir); default: random init.")
def finetune(shards: str, val_shards: str, test_shards: str | None, init: str | None, **flags) -> None:
    """Fine-tune on a PhilEO Bench task (launch with torchrun for several ranks)."""
    from training.finetune.trainer import finetune as run

    _setup_logging()
    with _one_line_errors():
        _check_model(flags["model"])
        run(_finetune_config(flags, shards, val_shards, test_shards, init))


def _sweep_grid_options(function):
    """The fine-tuning options with --model and --mode repeatable: the sweep's grid."""
    function = _finetune_options(function)
    function.__click_params__ = [p for p in function.__click_params__ if p.name not in ("model", "mode")]
    return _apply(function, [
        click.option("--model", "models", multiple=True, help="Repeatable: models to compare "
                     f"[default: {FinetuneRunConfig.model}]."),
        click.option("--mode", "modes", multiple=True, type=click.Choice(["frozen", "full"]),
                     help="Repeatable [default: full]. frozen applies to pretrained inits only; a random init "
                          "is trained in full, once."),
    ])


@main.command("nshot-sweep")
@_sweep_grid_options
@click.option("--data", required=True, help="A phileo-bench build: DATA/{task}-n{n}/ and/or DATA/{task}-p{P}/, "
                                             "DATA/test/.")
@click.option("--n-shot", "n_shot", help="Comma-separated n values, e.g. 50,100,500,1000.")
@click.option("--split-ratio", "split_ratio", help="Comma-separated split ratios P of `phileo-shard build "
                                                   "--split-ratio`, e.g. 0.1,0.5,1.")
@click.option("--init", "inits", multiple=True,
              help="Repeatable: random, CKPT or NAME=CKPT, each optionally MODEL:... for one --model only "
                   "[default: random].")
def nshot_sweep(data: str, n_shot: str | None, split_ratio: str | None, inits: tuple[str, ...],
                models: tuple[str, ...], modes: tuple[str, ...], **flags) -> None:
    """Fine-tune every (model, init, mode, n or P); write results.csv, results.md and the curves to --out."""
    from training.distributed import init_world, shutdown
    from training.finetune.sweep import parse_inits, run_sweep, sweep_points, sweep_runs

    _setup_logging()
    with _one_line_errors():
        models = tuple(dict.fromkeys(models)) or (FinetuneRunConfig.model,)
        for model in models:
            _check_model(model)
        if not n_shot and not split_ratio:
            raise ConfigError("--n-shot or --split-ratio: give the n values and/or split ratios to sweep")
        points = sweep_points(_parse_n_values(n_shot) if n_shot else [],
                              _parse_ratios(split_ratio) if split_ratio else [])
        runs = sweep_runs(models, tuple(dict.fromkeys(modes)) or ("full",), parse_inits(inits, models))
        base = _finetune_config({**flags, "mode": "full", "model": models[0]}, "-", "-", None, None)
        world = init_world()
        try:
            run_sweep(base, world, data, points, runs, flags["out"])
        finally:
            shutdown(world)


def _parse_n_values(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--n-shot {text}: expected comma-separated integers, e.g. 50,100,500") from None
    if not values or min(values) < 1:
        raise ConfigError(f"--n-shot {text}: expected positive integers")
    return values


def _parse_ratios(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--split-ratio {text}: expected comma-separated fractions, e.g. 0.1,0.5,1") from None
    if not values or not all(0 < v <= 1 for v in values):
        raise ConfigError(f"--split-ratio {text}: expected fractions in (0, 1]")
    return values


@main.command()
@click.option("--model", required=True, help="A registered model with encode(x) -> (B, D).")
@click.option("--init", required=True, help="Its weights: a phileo-train checkpoint (file or sharded dir) "
          "or a state-dict file.")
@click.option("--shards", required=True, help="manifest.json (path/URL), dataset dir, URL list or pattern.")
@output_option("Output directory: embeddings/part_NNNNN.parquet (one per shard), embed.json, summary.json.",
               dest="out")
@_default(EmbedConfig, "fragment_size", type=int,
          help="Cut each tile into Major-TOM's grid of PX fragments (~10% overlap), one row each "
               "[default: one row per tile].")
@_default(EmbedConfig, "batch_size", help="Fragments per forward pass.")
@_default(EmbedConfig, "num_workers", help="DataLoader workers per rank (tile decoding).")
@_default(EmbedConfig, "max_bad_fraction", help="Fail past this unreadable share of tiles.")
def embed(**flags) -> None:
    """Embeddings of every tile (or fragment) in Major-TOM's parquet layout; resumable (launch with torchrun)."""
    from training.embed.run import embed as run_embed

    _setup_logging()
    with _one_line_errors():
        _check_model(flags["model"])
        summary = run_embed(EmbedConfig(**flags))
    if summary is not None:
        totals = summary["totals"]
        click.echo(f"embedded {totals['tiles']} of {summary['planned_tiles']} tiles ({totals['bad_tiles']} bad): "
                   f"{totals['rows']} rows in {totals['parts']} parts under {flags['out']}")


if __name__ == "__main__":
    main()
