"""`phileo-train finetune`: PhilEO Bench fine-tuning from shards, with early stopping and test metrics.

Per epoch: set the lr (the benchmark's x10-per-epoch warmup, then constant / plateau /
cosine), train on exactly `plan.steps` batches per rank, compute the exact validation
loss over all ranks, keep the best weights. At the end the *best* weights (the original
evaluated the last epoch's by mistake) are tested; metrics.json, a confusion matrix
(land cover, classification) and prediction previews go to the run directory, and after
every epoch last.pt, loss.png, lr.png (and with --vis-val val_images/val_{epoch}.png).

Inputs follow the model's `input_spec` (phileo/models/inputs.py: bands, scaling, centre crop
of image and dense label) for training, validation and test alike; data of another patch
size is refused before training. Losses and metrics per task: training/finetune/tasks.py.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path

import torch
from tqdm import tqdm

from phileo.models.inputs import input_spec, prepare_input, prepare_target
from phileo.models.task_heads import build_task_model
from training.checkpoint import load_model_weights
from training.config import ConfigError, FinetuneConfig, TrainingDiverged
from training.data.epoch import plan_epoch
from training.data.loader import StreamOptions
from training.data.shards import resolve_shards
from training.distributed import World, all_reduce_sum_int, barrier, init_world, shutdown
from training.finetune.augment import apply_noise
from training.finetune.data import eval_loader, peek_patch_shape, train_loader
from training.finetune.tasks import Task, summary

log = logging.getLogger(__name__)
VAL_IMAGES = 5  # patches drawn per epoch with --vis-val, as the bench's val_visualize


class LRSchedule:
    """The benchmark's schedule: warmup from lr / gamma**W (or `start`), x gamma per epoch; then none, plateau
    or cosine. With `start` (--warmup-lr-start) the warmup rises geometrically from start to lr in W epochs."""

    def __init__(self, base: float, warmup_epochs: int, gamma: float, kind: str, min_lr: float,
                 start: float | None = None):
        self.base, self.warmup, self.gamma, self.kind, self.min_lr = base, warmup_epochs, gamma, kind, min_lr
        self.start = start
        self.plateau_lr, self.plateau_best, self.plateau_bad = base, math.inf, 0
        self.cosine_batches = 0

    def for_epoch(self, epoch: int) -> float:
        if epoch < self.warmup:
            if self.start is None:
                return self.base / self.gamma ** (self.warmup - epoch)
            return self.start * (self.base / self.start) ** (epoch / self.warmup)
        return self.plateau_lr if self.kind == "plateau" else self.base

    def for_batch(self, epoch: int) -> float:
        """Cosine with warm restarts (T_0 = 20 batches, T_mult 2) is stepped per batch, as the original."""
        if self.kind != "cosine" or epoch < self.warmup:
            return self.for_epoch(epoch)
        period, position = 20, self.cosine_batches
        while position >= period:
            position, period = position - period, period * 2
        self.cosine_batches += 1
        return self.min_lr + (self.base - self.min_lr) * (1 + math.cos(math.pi * position / period)) / 2

    def end_epoch(self, epoch: int, val_loss: float) -> None:
        """ReduceLROnPlateau(factor 0.1, patience 6, min_lr) on the validation loss, after warmup."""
        if self.kind != "plateau" or epoch < self.warmup:
            return
        if val_loss < self.plateau_best:
            self.plateau_best, self.plateau_bad = val_loss, 0
            return
        self.plateau_bad += 1
        if self.plateau_bad > 6:
            self.plateau_lr, self.plateau_bad = max(self.min_lr, self.plateau_lr * 0.1), 0


class FinetuneTrainer:
    def __init__(self, config: FinetuneConfig, world: World):
        self.config, self.world, self.run_dir = config, world, Path(config.run.out)
        if world.is_primary:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=1))
            (self.run_dir / "history.jsonl").unlink(missing_ok=True)
        run, data = config.run, config.data
        self.task = Task.of(run.task, run.class_weights)
        self.train_shards = resolve_shards(data.shards)
        self.val_shards = resolve_shards(data.val_shards)
        self.test_shards = resolve_shards(data.test_shards) if data.test_shards else None
        torch.manual_seed(run.seed)  # same head initialisation on every rank
        self.model = self._build_model()
        self.spec = input_spec(self.model)
        self._check_datasets()
        self.model.to(world.device)
        if world.distributed and world.device.type == "cuda":
            self.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model)  # as the benchmark
        self.ddp = torch.nn.parallel.DistributedDataParallel(self.model) if world.distributed else self.model
        self.amp = run.amp and world.device.type == "cuda" and torch.cuda.is_bf16_supported()
        base_lr = config.optim.lr or 1e-3 * math.sqrt(world.world_size)
        start = config.optim.warmup_lr_start
        if start is not None and start > base_lr:
            raise ConfigError(f"--warmup-lr-start {start}: above the lr {base_lr:g}; warmup rises to the lr")
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trainable, lr=base_lr, eps=1e-6, weight_decay=config.optim.weight_decay)
        self.schedule = LRSchedule(base_lr, config.optim.warmup_epochs, config.optim.warmup_gamma,
                                   config.optim.lr_scheduler, config.optim.min_lr, start)
        # one 'crop' per patch, uncut (crop_size 0): PhilEO Bench patches are the model's input size
        self.options = StreamOptions.from_config(data, run.seed, crops_per_tile=1, crop_size=0)
        self.best_loss, self.best_epoch, self.best_state = math.inf, -1, None

    def _build_model(self) -> torch.nn.Module:
        run = self.config.run
        init_state = load_model_weights(run.init) if run.init else None
        try:
            return build_task_model(run.model, self.task.kind, init_state, freeze_encoder=run.mode == "frozen",
                                    num_classes=self.task.num_classes, **run.model_args)
        except TypeError as error:  # a factory argument it does not take
            raise ConfigError(f"--model {run.model} --model-arg {run.model_args}: {error}") from None
        except ValueError as error:  # no classifier variant, an --init of another model
            raise ConfigError(f"--model {run.model}: {error}") from None

    def _check_datasets(self) -> None:
        """One-line error before training when a dataset's patches cannot feed the model (size or bands)."""
        for flag, shards in (("--shards", self.train_shards), ("--val-shards", self.val_shards),
                             ("--test-shards", self.test_shards)):
            shape = peek_patch_shape(shards) if shards else None
            if shape is not None:
                try:
                    self.spec.check_data(shape[0], shape[-1], f"{flag} for --model {self.config.run.model}")
                except ValueError as error:
                    raise ConfigError(str(error)) from None

    def _inputs(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's input (its bands, scaling and crop; augmentation noise when drawn) and the target."""
        device = self.world.device
        image = apply_noise(prepare_input(batch["s2"].to(device, non_blocking=True), self.spec), batch, self.spec)
        return image, prepare_target(batch["target"].to(device), self.spec)

    def _set_train_mode(self) -> None:
        self.model.train()
        if self.config.run.mode == "frozen":  # a frozen encoder keeps its BatchNorm statistics too
            for name, module in self.model.named_modules():  # prefixes may be nested, e.g. "coreunet.stem."
                if name and f"{name}.".startswith(self.model.encoder_prefixes):
                    module.eval()

    def train_epoch(self, epoch: int) -> float:
        data = self.config.data
        plan = plan_epoch(self.train_shards, self.world.world_size, data.num_workers, data.batch_size, 1,
                          self.config.run.seed, epoch, shuffle_buffer=data.shuffle_buffer)
        loader = train_loader(plan, self.world.rank, self.task.name, self.options, data.num_workers,
                              augmentations=data.augmentations)
        self._set_train_mode()
        total, count = 0.0, 0
        bar = tqdm(loader, total=plan.steps, disable=not self.world.is_primary, desc=f"epoch {epoch}",
                   unit="batch", leave=False)
        for batch in bar:
            lr = self.schedule.for_batch(epoch)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            image, target = self._inputs(batch)
            with torch.autocast(self.world.device.type, dtype=torch.bfloat16, enabled=self.amp):
                output = self.ddp(image)
            loss_sum, terms = self.task.loss_sum(output, target)
            loss = loss_sum / terms.clamp(min=1)
            loss.backward()
            # the gradients are synced, so every rank sees the same norm and stops at the same batch
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), math.inf)
            if not torch.isfinite(norm):
                raise TrainingDiverged(f"epoch {epoch} batch {count + 1}: loss {loss.item():.4g}, gradient norm "
                                       "not finite; stopped before the optimizer step (lower --lr?)")
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            total, count = total + loss.item(), count + 1
        return total / max(count, 1)

    @torch.no_grad()
    def evaluate(self, shards, metrics: bool = False, previews: list | None = None,
                 max_previews: int = 0) -> tuple[float, object]:
        """Exact mean loss over every patch of `shards` (all ranks), and the task metrics when asked.
        `previews` collects (DN image cropped as the model's input, target, output) of the first patches."""
        self.model.eval()
        data = self.config.data
        loader = eval_loader(shards, self.world.rank, self.world.world_size, self.task.name, data.batch_size,
                             data.num_workers, data.max_bad_fraction)
        tracker = self.task.tracker(self.world.device)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.world.device)
        count = 0
        for batch in loader:
            image, target = self._inputs(batch)
            output = self.model(image).float()  # no autocast, as the benchmark's evaluation
            batch_loss, terms = self.task.loss_sum(output, target)
            loss_sum += batch_loss.double()
            count += int(terms)
            if metrics:
                self.task.update(tracker, output, target)
            if previews is not None and len(previews) < max_previews:
                dn = prepare_target(batch["s2"], self.spec)  # the model's crop, all 10 bands for the RGB
                previews.append((dn, target.cpu(), output.cpu()))
        if self.world.distributed:
            torch.distributed.all_reduce(loss_sum)
            if metrics:
                tracker.reduce_(self.world)
        count = all_reduce_sum_int(count, self.world)
        return float(loss_sum) / max(count, 1), tracker

    def fit(self) -> list[dict]:
        history, stale = [], 0
        for epoch in range(self.config.optim.epochs):
            started = time.monotonic()
            train_loss = self.train_epoch(epoch)
            previews: list | None = [] if self.config.run.vis_val and self.world.is_primary else None
            val_loss, _ = self.evaluate(self.val_shards, previews=previews, max_previews=VAL_IMAGES)
            if not math.isfinite(val_loss):
                raise RuntimeError(f"epoch {epoch}: validation loss is {val_loss}; try a lower --lr")
            lr = self.optimizer.param_groups[0]["lr"]
            self.schedule.end_epoch(epoch, val_loss)
            improved = val_loss < self.best_loss - self.config.optim.es_delta
            if improved:  # a copy, not a reference: later steps must not change the kept weights
                self.best_loss, self.best_epoch, stale = val_loss, epoch, 0
                self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
            else:
                stale += 1
            record = {"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss, "best": improved,
                      "lr": lr, "seconds": time.monotonic() - started}
            history.append(record)
            self._end_epoch(history, previews)
            if stale >= self.config.optim.es_patience:
                log.info("early stop at epoch %d: no val-loss improvement for %d epochs", epoch, stale)
                break
        return history

    def _end_epoch(self, history: list[dict], previews: list | None) -> None:
        """history.jsonl, last.pt, loss.png and lr.png (the bench's plot_curves), val_images/ with --vis-val."""
        if not self.world.is_primary:
            return
        from training.finetune.plots import save_curves, save_task_previews

        record = history[-1]
        with open(self.run_dir / "history.jsonl", "a") as file:
            file.write(json.dumps(record) + "\n")
        log.info("epoch %d: train loss %.5f, val loss %.5f%s", record["epoch"], record["train_loss"],
                 record["val_loss"], " (best)" if record["best"] else "")
        state = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        save_weights(self.run_dir / "last.pt", state, record["epoch"], self.config)
        save_curves(history, self.run_dir)
        if previews:
            save_task_previews(previews, self.task, self.run_dir / "val_images" / f"val_{record['epoch']}.png",
                               VAL_IMAGES)

    def test(self) -> dict:
        self.model.load_state_dict(self.best_state)
        previews: list = []
        loss, tracker = self.evaluate(self.test_shards, metrics=True,
                                      previews=previews if self.world.is_primary else None,
                                      max_previews=self.config.run.previews)
        results = {"loss": loss, **tracker.compute()}
        if self.world.is_primary:
            from training.finetune.plots import save_confusion_matrix, save_task_previews

            matrix = self.task.confusion(tracker)
            if matrix is not None:
                save_confusion_matrix(matrix, list(self.task.class_names), self.run_dir / "confusion_matrix.png")
            if previews and self.config.run.previews:
                save_task_previews(previews, self.task, self.run_dir / "previews.png", self.config.run.previews)
        return results


def save_weights(path: Path, state: dict, epoch: int, config: FinetuneConfig) -> None:
    """best.pt / last.pt: {"model": state dict, "epoch", "config"}, written whole or not at all."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"model": state, "epoch": epoch, "config": config.to_dict()}, tmp)
    os.replace(tmp, path)


def run_finetune(config: FinetuneConfig, world: World) -> dict:
    """One fine-tuning run in an initialised world; returns what it writes to metrics.json."""
    run_dir = Path(config.run.out)
    trainer = FinetuneTrainer(config, world)
    barrier(world)
    started = time.monotonic()
    history = trainer.fit()
    results = {"task": config.run.task, "model": config.run.model, "init": config.run.init,
               "mode": config.run.mode, "world_size": world.world_size, "epochs_run": len(history),
               "best_epoch": trainer.best_epoch, "best_val_loss": trainer.best_loss,
               "train_patches": sum(s.samples for s in trainer.train_shards),
               "seconds": time.monotonic() - started}
    if trainer.test_shards is not None:
        results["test"] = trainer.test()
    if world.is_primary:
        save_weights(run_dir / "best.pt", trainer.best_state, trainer.best_epoch, config)
        (run_dir / "metrics.json").write_text(json.dumps(results, indent=1))
        log.info("done: best epoch %d (val loss %.5f); %s", trainer.best_epoch, trainer.best_loss,
                 summary(results))
    barrier(world)
    return results


def finetune(config: FinetuneConfig) -> dict:
    """Entry point of `phileo-train finetune` (one process per rank under torchrun)."""
    world = init_world()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
    try:
        return run_finetune(config, world)
    finally:
        shutdown(world)
