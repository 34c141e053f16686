"""`phileo-train nshot-sweep`: fine-tune every (init, n) pair and tabulate test metrics like the paper.

Data comes from one `phileo-shard build --source phileo-bench --n-shot ...` output:
DATA/{task}-n{n}/train, DATA/{task}-n{n}/val and the shared DATA/test. Every run writes its
own directory OUT/{init}/n{n}; the sweep writes results.csv, results.md and the n-shot curve.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
from pathlib import Path

from phileo.phileo_bench import REGRESSION_TASKS
from phileo.schema import MANIFEST
from training.config import ConfigError, FinetuneConfig
from training.distributed import World
from training.finetune.trainer import run_finetune

log = logging.getLogger(__name__)
RANDOM_INIT = "random"


def paper_metric(task: str) -> str:
    """RMSE for the density tasks, overall accuracy for land cover (the paper's figures)."""
    return "rmse" if task in REGRESSION_TASKS else "overall_accuracy"


def parse_inits(values: tuple[str, ...]) -> dict[str, str | None]:
    """`--init` values: "random", PATH, or NAME=PATH. The name labels the curve; it defaults to the run dir."""
    inits: dict[str, str | None] = {}
    for value in values or (RANDOM_INIT,):
        if value == RANDOM_INIT:
            name, path = RANDOM_INIT, None
        elif "=" in value:
            name, path = value.split("=", 1)
        else:
            checkpoint = Path(value)
            run_dir = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent
            name, path = run_dir.name or checkpoint.stem, value
        if path is not None and not Path(path).exists():
            raise ConfigError(f"--init {value}: {path} does not exist")
        if name in inits:
            raise ConfigError(f"--init {value}: the name {name!r} is used twice; label them as NAME=PATH")
        inits[name] = path
    return inits


def sweep_datasets(data: str, task: str, n: int) -> tuple[str, str, str]:
    root = Path(data)
    train, val, test = root / f"{task}-n{n}" / "train", root / f"{task}-n{n}" / "val", root / "test"
    for path in (train, val, test):
        if not (path / MANIFEST).is_file():
            raise ConfigError(f"--data {data}: {path}/manifest.json is missing; build it with "
                              f"`phileo-shard build --source phileo-bench --task {task} --n-shot {n} ...`")
    return str(train), str(val), str(test)


def run_sweep(base: FinetuneConfig, world: World, data: str, n_values: list[int], inits: dict[str, str | None],
              out: str) -> list[dict]:
    """Every (init, n) run in order on all ranks; rows of the results table."""
    task, metric, rows = base.run.task, paper_metric(base.run.task), []
    for name, init in inits.items():
        for n in n_values:
            train, val, test = sweep_datasets(data, task, n)
            config = FinetuneConfig(
                dataclasses.replace(base.run, out=str(Path(out) / name / f"n{n}"), init=init,
                                    mode=base.run.mode if init else "full"),
                dataclasses.replace(base.data, shards=train, val_shards=val, test_shards=test), base.optim)
            log.info("n-shot sweep: init %s, n=%d", name, n)
            results = run_finetune(config, world)
            rows.append({"task": task, "init": name, "n": n, "mode": config.run.mode, metric: results["test"][metric],
                         **{k: results["test"][k] for k in ("mse", "miou") if k in results["test"]},
                         "best_epoch": results["best_epoch"], "epochs_run": results["epochs_run"]})
    if world.is_primary:
        write_results(rows, metric, Path(out), task)
    return rows


def write_results(rows: list[dict], metric: str, out: Path, task: str) -> None:
    from training.finetune.plots import markdown_table, save_nshot_curve

    out.mkdir(parents=True, exist_ok=True)
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with open(out / "results.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    (out / "results.md").write_text(f"# {task}: test {metric} by n-shot\n\n{markdown_table(rows, metric)}\n")
    save_nshot_curve(rows, metric, out / f"nshot_{metric}.png", title=f"PhilEO Bench {task}")
    log.info("sweep results in %s (results.csv, results.md, nshot_%s.png)", out, metric)
