"""`phileo-train nshot-sweep`: fine-tune every (model, init, mode, n or P) and tabulate test metrics like the paper.

Data comes from one `phileo-shard build --source phileo-bench` output: DATA/{task}-n{n}/train|val
(`--n-shot`), DATA/{task}-p{P}/train|val (`--split-ratio`) and the shared DATA/test. Each run
writes its own directory OUT/{model}/{init}-{mode}/n{n} (or .../p{P}); the sweep writes
results.csv and results.md (one row per run) and the paper's curves: nshot_{metric}.png (metric
vs n) and split_{metric}.png (metric vs P), one line per model x init x mode. `--mode frozen`
applies to pretrained inits only: a random init is always trained in full, once.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

from phileo.phileo_bench import REGRESSION_TASKS, subset_name, subset_suffix
from phileo.schema import MANIFEST
from training.config import ConfigError, FinetuneConfig
from training.distributed import World
from training.finetune.data import dense_task
from training.finetune.trainer import run_finetune

log = logging.getLogger(__name__)
RANDOM_INIT = "random"


def paper_metric(task: str) -> str:
    """RMSE for the density tasks, overall accuracy for land cover (the paper's figures)."""
    return "rmse" if task in REGRESSION_TASKS else "overall_accuracy"


@dataclass(frozen=True)
class Init:
    """One `--init`: a name (labels the runs), a checkpoint (None: random) and the model it is for (None: all)."""

    name: str
    path: str | None
    model: str | None = None


@dataclass(frozen=True)
class SweepRun:
    """One line of the curves: a model with an init, trained in one mode."""

    model: str
    init: Init
    mode: str

    @property
    def series(self) -> str:
        return f"{self.model} {self.init.name}-{self.mode}"

    def directory(self, out: str, point: str) -> str:
        return str(Path(out) / self.model / f"{self.init.name}-{self.mode}" / point)


def parse_inits(values: tuple[str, ...], models: tuple[str, ...] = ()) -> list[Init]:
    """`--init` values: random, PATH, NAME=PATH, each optionally MODEL:... to apply to one --model only.

    A PATH's name defaults to its run directory (the folder above checkpoints/).
    """
    inits: list[Init] = []
    for value in values or (RANDOM_INIT,):
        head, colon, rest = value.partition(":")
        model, spec = (head, rest) if colon and head in models else (None, value)
        if spec == RANDOM_INIT:
            name, path = RANDOM_INIT, None
        elif "=" in spec:
            name, path = spec.split("=", 1)
        else:
            checkpoint = Path(spec)
            run_dir = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent
            name, path = run_dir.name or checkpoint.stem, spec
        if path is not None and not Path(path).exists():
            raise ConfigError(f"--init {value}: {path} does not exist")
        if any(i.name == name and None in (i.model, model) or i.name == name and i.model == model for i in inits):
            raise ConfigError(f"--init {value}: the name {name!r} is used twice; label them as NAME=PATH")
        inits.append(Init(name, path, model))
    return inits


def sweep_runs(models: tuple[str, ...], modes: tuple[str, ...], inits: list[Init]) -> list[SweepRun]:
    """Every (model, init, mode) in that order; a random init runs once, in full mode."""
    runs = []
    for model in models:
        mine = [init for init in inits if init.model in (None, model)]
        if not mine:
            raise ConfigError(f"--model {model}: no --init applies to it (add --init random or --init {model}:CKPT)")
        for init in mine:
            runs += [SweepRun(model, init, "full")] if init.path is None else [SweepRun(model, init, m) for m in modes]
    return runs


def sweep_points(n_values: list[int], ratios: list[float]) -> list[tuple[str, int | float]]:
    """[("n", 50), ..., ("p", 0.1), ...]: the x values of the sweep."""
    return [("n", n) for n in n_values] + [("p", p) for p in ratios]


def sweep_datasets(data: str, task: str, axis: str, value: int | float) -> tuple[str, str, str]:
    root = Path(data)
    task = dense_task(task)  # a classification task reads its dense task's patches
    subset = root / subset_name(task, axis, value)
    train, val, test = subset / "train", subset / "val", root / "test"
    flag = f"--n-shot {value}" if axis == "n" else f"--split-ratio {value:g}"
    for path in (train, val, test):
        if not (path / MANIFEST).is_file():
            raise ConfigError(f"--data {data}: {path}/manifest.json is missing; build it with "
                              f"`phileo-shard build --source phileo-bench --task {task} {flag} ...`")
    return str(train), str(val), str(test)


def run_sweep(base: FinetuneConfig, world: World, data: str, points: list[tuple[str, int | float]],
              runs: list[SweepRun], out: str) -> list[dict]:
    """Every run at every point, in order, on all ranks; rows of the results table."""
    task, metric, rows = base.run.task, paper_metric(base.run.task), []
    datasets = {subset_suffix(*p): sweep_datasets(data, task, *p) for p in points}  # all checked first
    for run in runs:
        for axis, value in points:
            point = subset_suffix(axis, value)
            train, val, test = datasets[point]
            config = FinetuneConfig(
                dataclasses.replace(base.run, out=run.directory(out, point), model=run.model, init=run.init.path,
                                    mode=run.mode),
                dataclasses.replace(base.data, shards=train, val_shards=val, test_shards=test), base.optim)
            log.info("sweep: %s, %s", run.series, point)
            results = run_finetune(config, world)
            rows.append({"task": task, "model": run.model, "init": run.init.name, "mode": run.mode,
                         "n": value if axis == "n" else "", "p": value if axis == "p" else "",
                         metric: results["test"][metric],
                         **{k: results["test"][k] for k in ("mse", "miou") if k in results["test"]},
                         "best_epoch": results["best_epoch"], "epochs_run": results["epochs_run"],
                         "train_patches": results["train_patches"], "series": run.series,
                         "run_dir": str(Path(config.run.out).relative_to(out))})
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
    text, figures = [f"# {task}: test {metric}\n"], []
    for axis, title, figure in (("n", "by n-shot", f"nshot_{metric}.png"), ("p", "by split ratio P",
                                                                            f"split_{metric}.png")):
        if any(row[axis] != "" for row in rows):
            text.append(f"## {title}\n\n{markdown_table(rows, metric, axis)}\n![{title}]({figure})\n")
            save_nshot_curve(rows, metric, out / figure, title=f"PhilEO Bench {task}", x=axis)
            figures.append(figure)
    (out / "results.md").write_text("\n".join(text))
    log.info("sweep results in %s (results.csv, results.md, %s)", out, ", ".join(figures))
