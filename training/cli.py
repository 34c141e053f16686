"""`phileo-train` command line: flags override the config dataclasses, nothing more."""

from __future__ import annotations

import logging
import sys

import click

from training.config import ConfigError, DataConfig, OptimConfig, PretrainConfig, RunConfig


def _data_options(function):
    options = [
        click.option("--shards", required=True, help="manifest.json (path/URL), dataset dir, URL list or pattern."),
        click.option("--crops-per-tile", default=16, show_default=True, help="Random crops cut from each tile."),
        click.option("--crop-size", default=128, show_default=True),
        click.option("--batch-size", default=16, show_default=True, help="Crops per rank per micro-step."),
        click.option("--num-workers", default=2, show_default=True, help="DataLoader workers per rank."),
        click.option("--shuffle-buffer", default=512, show_default=True, help="Crops in each worker's buffer."),
        click.option("--shards-in-parallel", default=4, show_default=True, help="Shards interleaved per worker."),
        click.option("--max-bad-fraction", default=0.01, show_default=True, help="Fail past this unreadable share."),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("numexpr").setLevel(logging.WARNING)


def _fail(error: Exception) -> None:
    click.echo(f"error: {error}", err=True)
    sys.exit(2)


@click.group()
def main() -> None:
    """Pretrain and fine-tune PhilEO geospatial foundation models on phileo-shard datasets."""


@main.command()
@_data_options
@click.option("--out", required=True, help="Run directory (config, metrics, checkpoints).")
@click.option("--model", default="geoaware-unet-44m", show_default=True)
@click.option("--epochs", type=int, default=1, show_default=True)
@click.option("--steps", type=int, help="Optimizer steps (overrides --epochs).")
@click.option("--seed", default=0, show_default=True)
@click.option("--lr", type=float, help="Peak learning rate [default: the original's, x sqrt(world size): "
              "1e-4 for the U-Nets, 3e-5 for the ViTs].")
@click.option("--min-lr", type=float, help="Final learning rate [default: 1e-6 U-Nets, 1e-8 ViTs].")
@click.option("--weight-decay", default=0.01, show_default=True)
@click.option("--warmup-steps", default=100, show_default=True)
@click.option("--grad-clip", default=1.0, show_default=True)
@click.option("--grad-accum", default=1, show_default=True)
@click.option("--ckpt-every", default=500, show_default=True, help="Checkpoint every N optimizer steps.")
@click.option("--keep-checkpoints", default=3, show_default=True)
@click.option("--log-every", default=10, show_default=True)
@click.option("--record-keys", help="Directory: each rank appends the tile key of every crop to rank{r}.txt.")
@click.option("--resume", is_flag=True, help="Continue from the newest checkpoint in --out.")
@click.option("--amp/--no-amp", default=True, show_default=True, help="bf16 autocast where supported.")
@click.option("--strategy", type=click.Choice(["ddp", "fsdp"]), default="ddp", show_default=True,
              help="fsdp: FSDP2 per block (bf16 params, fp32 reduce) for the 200M/300M models.")
@click.option("--activation-checkpointing", is_flag=True, help="Recompute blocks in backward to save memory.")
def pretrain(**flags) -> None:
    """Pretrain a model by streaming shards (launch with torchrun for several ranks)."""
    from phileo.models import list_models
    from training.data.epoch import PlanError
    from training.data.shards import ShardSpecError
    from training.pretrain import pretrain as run_pretrain

    _setup_logging()
    try:
        if flags["model"] not in list_models():
            raise ConfigError(f"--model {flags['model']}: unknown; choose one of {', '.join(list_models())}")
        config = PretrainConfig(
            RunConfig(**{k: flags[k] for k in ("out", "model", "epochs", "steps", "seed", "ckpt_every",
                                              "keep_checkpoints", "log_every", "record_keys", "resume", "amp",
                                              "strategy", "activation_checkpointing")}),
            DataConfig(**{k: flags[k] for k in DataConfig.__dataclass_fields__}),
            OptimConfig(**{k: flags[k] for k in OptimConfig.__dataclass_fields__}))
        run_pretrain(config)
    except (ConfigError, ShardSpecError, PlanError) as error:
        _fail(error)


@main.command("bench-data")
@_data_options
@click.option("--seconds", type=float, default=30.0, show_default=True,
              help="Wall time to stream after the first batch (start-up is timed apart), looping epochs.")
@click.option("--seed", default=0, show_default=True)
def bench_data(seconds: float, seed: int, **flags) -> None:
    """Time the training data pipeline alone (no model): crops/s, tiles/s, MB/s, batch diversity, peak RSS."""
    from training.bench_data import BenchConfig, format_report, run_bench
    from training.data.epoch import PlanError
    from training.data.shards import ShardSpecError

    _setup_logging()
    try:
        result = run_bench(BenchConfig(DataConfig(**flags), seconds, seed))
    except (ConfigError, ShardSpecError, PlanError) as error:
        _fail(error)
    for line in format_report(result):
        click.echo(line)


def _finetune_options(function):
    options = [
        click.option("--task", required=True, type=click.Choice(["roads", "buildings", "landcover"])),
        click.option("--out", required=True, help="Run directory (config, history, best.pt, metrics.json)."),
        click.option("--model", default="geoaware-unet-44m", show_default=True),
        click.option("--mode", type=click.Choice(["frozen", "full"]), default="full", show_default=True,
                     help="frozen: train decoder/head on a frozen pretrained encoder."),
        click.option("--epochs", default=250, show_default=True),
        click.option("--lr", type=float, help="Learning rate after warmup [default: 1e-3 x sqrt(world size)]."),
        click.option("--weight-decay", default=0.01, show_default=True),
        click.option("--warmup-epochs", default=5, show_default=True, help="Epochs of x10 warmup (0: none)."),
        click.option("--warmup-gamma", default=10.0, show_default=True),
        click.option("--lr-scheduler", type=click.Choice(["none", "plateau", "cosine"]), default="none",
                     show_default=True),
        click.option("--min-lr", default=1e-6, show_default=True),
        click.option("--es-patience", default=50, show_default=True, help="Early stop after N epochs without "
                     "a val-loss improvement."),
        click.option("--es-delta", default=0.0, show_default=True),
        click.option("--batch-size", default=16, show_default=True, help="Patches per rank per step."),
        click.option("--num-workers", default=2, show_default=True, help="DataLoader workers per rank."),
        click.option("--shuffle-buffer", default=256, show_default=True),
        click.option("--seed", default=123456, show_default=True),
        click.option("--amp/--no-amp", default=True, show_default=True, help="bf16 autocast on CUDA."),
        click.option("--previews", default=4, show_default=True, help="Test patches drawn in previews.png."),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def _finetune_config(flags: dict, shards: str, val_shards: str, test_shards: str | None, init: str | None):
    from training.config import FinetuneConfig, FinetuneDataConfig, FinetuneOptimConfig, FinetuneRunConfig

    run = FinetuneRunConfig(**{k: flags[k] for k in ("out", "task", "model", "mode", "seed", "amp", "previews")},
                            init=init)
    data = FinetuneDataConfig(shards, val_shards, test_shards,
                              **{k: flags[k] for k in ("batch_size", "num_workers", "shuffle_buffer")})
    optim = FinetuneOptimConfig(**{k: flags[k] for k in FinetuneOptimConfig.__dataclass_fields__})
    return FinetuneConfig(run, data, optim)


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
    from training.data.epoch import PlanError
    from training.data.shards import ShardSpecError
    from training.finetune.trainer import finetune as run

    _setup_logging()
    try:
        _check_model(flags["model"])
        run(_finetune_config(flags, shards, val_shards, test_shards, init))
    except (ConfigError, ShardSpecError, PlanError) as error:
        _fail(error)


@main.command("nshot-sweep")
@_finetune_options
@click.option("--data", required=True, help="A phileo-bench build with --n-shot: DATA/{task}-n{n}/, DATA/test/.")
@click.option("--n-shot", "n_shot", required=True, help="Comma-separated n values, e.g. 50,100,500,1000.")
@click.option("--init", "inits", multiple=True, help="Repeatable: random, CKPT or NAME=CKPT [default: random].")
def nshot_sweep(data: str, n_shot: str, inits: tuple[str, ...], **flags) -> None:
    """Fine-tune every (init, n) pair; write results.csv, results.md and the n-shot curve to --out."""
    from training.data.epoch import PlanError
    from training.data.shards import ShardSpecError
    from training.distributed import init_world, shutdown
    from training.finetune.sweep import parse_inits, run_sweep

    _setup_logging()
    try:
        _check_model(flags["model"])
        n_values = _parse_n_values(n_shot)
        named = parse_inits(inits)
        base = _finetune_config({**flags, "mode": "full"}, "-", "-", None, None)
        base.run.mode = flags["mode"]  # per run: frozen applies to pretrained inits only
        world = init_world()
        try:
            run_sweep(base, world, data, n_values, named, flags["out"])
        finally:
            shutdown(world)
    except (ConfigError, ShardSpecError, PlanError) as error:
        _fail(error)


def _parse_n_values(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--n-shot {text}: expected comma-separated integers, e.g. 50,100,500") from None
    if not values or min(values) < 1:
        raise ConfigError(f"--n-shot {text}: expected positive integers")
    return values


if __name__ == "__main__":
    main()
