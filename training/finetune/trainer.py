"""`phileo-train finetune`: PhilEO Bench fine-tuning from shards, with early stopping and test metrics.

Per epoch: set the lr (the benchmark's x10-per-epoch warmup, then constant / plateau /
cosine), train on exactly `plan.steps` batches per rank, compute the exact validation
loss over all ranks, keep the best weights. At the end the *best* weights (the original
evaluated the last epoch's by mistake) are tested; metrics.json, a confusion matrix
(land cover) and prediction previews go to the run directory.

Losses are the benchmark's: MSE on the raw output for roads/buildings (0..1 density),
cross-entropy for land cover, where pixels with a code outside WorldCover are ignored
(the original raised KeyError on them).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from phileo.models.task_heads import build_task_model
from phileo.phileo_bench import IGNORE_CLASS, NUM_LANDCOVER_CLASSES, REGRESSION_TASKS, WORLDCOVER_NAMES
from training.checkpoint import load_model_weights
from training.config import FinetuneConfig, TrainingDiverged
from training.data.epoch import plan_epoch
from training.data.loader import StreamOptions
from training.data.shards import resolve_shards
from training.distributed import World, all_reduce_sum_int, barrier, init_world, shutdown
from training.finetune.data import eval_loader, patch_input, train_loader
from training.finetune.metrics import ConfusionMatrix, RegressionMetrics

log = logging.getLogger(__name__)


class LRSchedule:
    """The benchmark's schedule: warmup from lr / gamma**W, x gamma per epoch; then none, plateau or cosine."""

    def __init__(self, base: float, warmup_epochs: int, gamma: float, kind: str, min_lr: float):
        self.base, self.warmup, self.gamma, self.kind, self.min_lr = base, warmup_epochs, gamma, kind, min_lr
        self.plateau_lr, self.plateau_best, self.plateau_bad = base, math.inf, 0
        self.cosine_batches = 0

    def for_epoch(self, epoch: int) -> float:
        if epoch < self.warmup:
            return self.base / self.gamma ** (self.warmup - epoch)
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


def task_loss(output: torch.Tensor, target: torch.Tensor, task: str, reduction: str = "mean") -> torch.Tensor:
    if task in REGRESSION_TASKS:
        return F.mse_loss(output.float(), target, reduction=reduction)
    return F.cross_entropy(output.float(), target, ignore_index=IGNORE_CLASS, reduction=reduction)


def _count(target: torch.Tensor, task: str) -> int:
    return target.numel() if task in REGRESSION_TASKS else int((target != IGNORE_CLASS).sum())


class FinetuneTrainer:
    def __init__(self, config: FinetuneConfig, world: World):
        self.config, self.world, self.run_dir = config, world, Path(config.run.out)
        if world.is_primary:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=1))
            (self.run_dir / "history.jsonl").unlink(missing_ok=True)
        run, data = config.run, config.data
        self.task = run.task
        self.train_shards = resolve_shards(data.shards)
        self.val_shards = resolve_shards(data.val_shards)
        self.test_shards = resolve_shards(data.test_shards) if data.test_shards else None
        torch.manual_seed(run.seed)  # same head initialisation on every rank
        init_state = load_model_weights(run.init) if run.init else None
        kind = "regression" if self.task in REGRESSION_TASKS else "segmentation"
        self.model = build_task_model(run.model, kind, init_state, freeze_encoder=run.mode == "frozen")
        self.model.to(world.device)
        if world.distributed and world.device.type == "cuda":
            self.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model)  # as the benchmark
        self.ddp = torch.nn.parallel.DistributedDataParallel(self.model) if world.distributed else self.model
        self.amp = run.amp and world.device.type == "cuda" and torch.cuda.is_bf16_supported()
        base_lr = config.optim.lr or 1e-3 * math.sqrt(world.world_size)
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trainable, lr=base_lr, eps=1e-6, weight_decay=config.optim.weight_decay)
        self.schedule = LRSchedule(base_lr, config.optim.warmup_epochs, config.optim.warmup_gamma,
                                   config.optim.lr_scheduler, config.optim.min_lr)
        # one 'crop' per patch, uncut (crop_size 0): PhilEO Bench patches are the model's input size
        self.options = StreamOptions.from_config(data, run.seed, crops_per_tile=1, crop_size=0)
        self.best_loss, self.best_epoch, self.best_state = math.inf, -1, None

    def _set_train_mode(self) -> None:
        self.model.train()
        if self.config.run.mode == "frozen":  # a frozen encoder keeps its BatchNorm statistics too
            for name, module in self.model.named_children():
                if f"{name}." in self.model.encoder_prefixes:
                    module.eval()

    def train_epoch(self, epoch: int) -> float:
        plan = plan_epoch(self.train_shards, self.world.world_size, self.config.data.num_workers,
                          self.config.data.batch_size, 1, self.config.run.seed, epoch,
                          shuffle_buffer=self.config.data.shuffle_buffer)
        loader = train_loader(plan, self.world.rank, self.task, self.options, self.config.data.num_workers)
        self._set_train_mode()
        total, count = 0.0, 0
        bar = tqdm(loader, total=plan.steps, disable=not self.world.is_primary, desc=f"epoch {epoch}",
                   unit="batch", leave=False)
        for batch in bar:
            lr = self.schedule.for_batch(epoch)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            image, target = patch_input(batch, self.world.device), batch["target"].to(self.world.device)
            with torch.autocast(self.world.device.type, dtype=torch.bfloat16, enabled=self.amp):
                output = self.ddp(image)
            loss = task_loss(output, target, self.task)
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
    def evaluate(self, shards, metrics: bool = False, previews: list | None = None) -> tuple[float, object]:
        """Exact mean loss over every patch of `shards` (all ranks), and the task metrics when asked."""
        self.model.eval()
        data = self.config.data
        loader = eval_loader(shards, self.world.rank, self.world.world_size, self.task, data.batch_size,
                             data.num_workers, data.max_bad_fraction)
        device = self.world.device
        tracker = (RegressionMetrics(device=device) if self.task in REGRESSION_TASKS
                   else ConfusionMatrix(NUM_LANDCOVER_CLASSES, device=device))
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.world.device)
        count = 0
        for batch in loader:
            image, target = patch_input(batch, self.world.device), batch["target"].to(self.world.device)
            output = self.model(image).float()  # no autocast, as the benchmark's evaluation
            loss_sum += task_loss(output, target, self.task, reduction="sum").double()
            count += _count(target, self.task)
            if metrics:
                tracker.update(output if self.task in REGRESSION_TASKS else output.argmax(1), target)
            if previews is not None and len(previews) < self.config.run.previews:
                previews.append((image.cpu(), target.cpu(), output.cpu()))
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
            val_loss, _ = self.evaluate(self.val_shards)
            if not math.isfinite(val_loss):
                raise RuntimeError(f"epoch {epoch}: validation loss is {val_loss}; try a lower --lr")
            self.schedule.end_epoch(epoch, val_loss)
            improved = val_loss < self.best_loss - self.config.optim.es_delta
            if improved:  # a copy, not a reference: later steps must not change the kept weights
                self.best_loss, self.best_epoch, stale = val_loss, epoch, 0
                self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
            else:
                stale += 1
            record = {"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss, "best": improved,
                      "lr": self.optimizer.param_groups[0]["lr"], "seconds": time.monotonic() - started}
            history.append(record)
            self._append_history(record)
            if stale >= self.config.optim.es_patience:
                log.info("early stop at epoch %d: no val-loss improvement for %d epochs", epoch, stale)
                break
        return history

    def _append_history(self, record: dict) -> None:
        if self.world.is_primary:
            with open(self.run_dir / "history.jsonl", "a") as file:
                file.write(json.dumps(record) + "\n")
            log.info("epoch %d: train loss %.5f, val loss %.5f%s", record["epoch"], record["train_loss"],
                     record["val_loss"], " (best)" if record["best"] else "")

    def test(self) -> dict:
        self.model.load_state_dict(self.best_state)
        previews: list = []
        loss, tracker = self.evaluate(self.test_shards, metrics=True,
                                      previews=previews if self.world.is_primary else None)
        results = {"loss": loss, **tracker.compute()}
        if self.world.is_primary:
            self._save_test_plots(tracker, previews)
        return results

    def _save_test_plots(self, tracker, previews: list) -> None:
        from training.finetune.plots import save_confusion_matrix, save_previews

        if self.task not in REGRESSION_TASKS:
            save_confusion_matrix(tracker.matrix, list(WORLDCOVER_NAMES), self.run_dir / "confusion_matrix.png")
        if previews:
            images, targets, outputs = (torch.cat([p[i] for p in previews]) for i in range(3))
            predictions = outputs if self.task in REGRESSION_TASKS else outputs.argmax(1)
            limit = self.config.run.previews
            save_previews(images[:limit].numpy(), targets[:limit].numpy(), predictions[:limit].numpy(), self.task,
                          self.run_dir / "previews.png", max_rows=limit)


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
        torch.save({"model": trainer.best_state, "epoch": trainer.best_epoch, "config": config.to_dict()},
                   run_dir / "best.pt")
        (run_dir / "metrics.json").write_text(json.dumps(results, indent=1))
        log.info("done: best epoch %d (val loss %.5f); %s", trainer.best_epoch, trainer.best_loss,
                 _summary(results))
    barrier(world)
    return results


def _summary(results: dict) -> str:
    test = results.get("test")
    if not test:
        return "no test split given"
    if "rmse" in test:
        return f"test RMSE {test['rmse']:.4f} (MSE {test['mse']:.5f})"
    return f"test accuracy {test['overall_accuracy']:.4f}, mIoU {test['miou']:.4f}"


def finetune(config: FinetuneConfig) -> dict:
    """Entry point of `phileo-train finetune` (one process per rank under torchrun)."""
    world = init_world()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
    try:
        return run_finetune(config, world)
    finally:
        shutdown(world)
