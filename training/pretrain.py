"""`phileo-train pretrain`: the streaming DDP pretraining loop.

Step order as nanoGPT: set lr, micro-steps (grad sync only on the last), clip, step,
zero_grad(set_to_none=True). Every rank runs the same number of steps by construction
(training/data/epoch.py), so no rank ever waits on a collective the others skip.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from collections import Counter
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from phileo.bands import MODEL_BANDS
from phileo.models import build as build_model
from training.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    load_sharded_into,
    save_checkpoint,
    save_sharded_checkpoint,
)
from training.config import ConfigError, PretrainConfig, TrainingDiverged
from training.data.deal import Segment
from training.data.epoch import EpochPlan, EpochPosition, fingerprint, plan_epoch
from training.data.loader import BAND_KEYS, StreamOptions, make_loader, model_input
from training.data.shards import resolve_shards
from training.distributed import World, all_reduce_mean, barrier, init_world, shutdown
from training.objective import foundation_loss, make_views
from training.parallel import parallelize

log = logging.getLogger(__name__)


def check_input_size(model: torch.nn.Module, name: str, crop_size: int, device: torch.device) -> None:
    """ConfigError now, not at the first step, when the model cannot take crops of `crop_size` px."""
    probe = torch.zeros(1, len(MODEL_BANDS), crop_size, crop_size, device=device)
    model.eval()
    try:
        with torch.no_grad():
            model(probe)
    except (RuntimeError, ValueError, AssertionError) as error:
        detail = " ".join(str(error).split())[:200]
        raise ConfigError(f"--crop-size {crop_size}: model {name} cannot take {crop_size} px inputs "
                          f"({detail})") from None
    finally:
        model.train()


def lr_at(step: int, base: float, min_lr: float, warmup: int, total: int) -> float:
    """Linear warmup, then cosine decay from `base` to `min_lr` at `total` steps (per step)."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_lr + 0.5 * (base - min_lr) * (1 + math.cos(math.pi * progress))


def split_views(outputs, size: int) -> tuple:
    """Split every tensor of a (nested) model output along the batch into (first `size`, rest)."""
    if isinstance(outputs, torch.Tensor):
        return outputs[:size], outputs[size:]
    if isinstance(outputs, (list, tuple)):
        pairs = [split_views(item, size) for item in outputs]
        return tuple(p[0] for p in pairs), tuple(p[1] for p in pairs)
    return outputs, outputs


class Trainer:
    """Holds model, optimizer and the data position; `run()` trains to the configured end."""

    def __init__(self, config: PretrainConfig, world: World):
        self.config, self.world = config, world
        self.run_dir = Path(config.run.out)
        self.shards = resolve_shards(config.data.shards)
        torch.manual_seed(config.run.seed)  # same initial weights on every rank
        self.model = build_model(config.run.model).to(world.device)
        check_input_size(self.model, config.run.model, config.data.crop_size, world.device)
        self.amp = config.run.amp and (world.device.type == "cpu" or torch.cuda.is_bf16_supported())
        self.sharded = config.run.strategy == "fsdp" and world.distributed
        self.ddp = parallelize(self.model, world, config.run.strategy, self.amp, config.run.activation_checkpointing)
        self.base_lr, self.min_lr = config.optim.resolved_lrs(config.run.model, world.world_size)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=self.base_lr,
                                           weight_decay=config.optim.weight_decay)
        self.step, self.epoch = 0, 0
        self.history: tuple[Segment, ...] = ()  # parts of this epoch trained before a resume (the position)
        self.plan: EpochPlan | None = None  # the epoch (segment) being trained
        self.segment_start = 0  # self.step when self.plan began
        self.options = StreamOptions.from_config(config.data, config.run.seed)
        self.total_steps = config.run.steps or self._plan(0).steps // config.optim.grad_accum * config.run.epochs
        self.tensorboard = None  # SummaryWriter on the primary rank, opened in run()
        self.recorded_keys: list[str] = []  # written at each checkpoint, so the audit matches saved training
        self.last_saved_step = -1
        self.generator = torch.Generator(world.device)
        self.crops_total, self.started = 0, time.monotonic()

    def _plan(self, epoch: int, history: tuple[Segment, ...] = ()) -> EpochPlan:
        data = self.config.data
        return plan_epoch(self.shards, self.world.world_size, data.num_workers, data.batch_size,
                          data.crops_per_tile, self.config.run.seed, epoch, self.config.optim.grad_accum, history,
                          data.shuffle_buffer, data.shards_in_parallel)

    def position(self) -> EpochPosition:
        """Where training stands: the epoch, and the segments of it trained so far (this run's included)."""
        if self.plan is not None and self.plan.epoch == self.epoch:
            return self.plan.position_after((self.step - self.segment_start) * self.config.optim.grad_accum)
        return EpochPosition(self.epoch, self.config.run.seed, self.config.data.crops_per_tile,
                             fingerprint(self.shards), self.history)

    def resume(self) -> None:
        path = latest_checkpoint(self.run_dir)
        if path is None:
            log.info("--resume: no checkpoint in %s, starting fresh", self.run_dir)
            return
        # Both kinds load into either strategy and any world size: state dicts are keyed by parameter name.
        if path.is_dir():
            state = load_sharded_into(path, self.model, self.optimizer)
        else:
            state = load_checkpoint(path)
            set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                           optim_state_dict=state["optimizer"], options=StateDictOptions(full_state_dict=True))
        position = self._checked_position(path, state)
        self.last_saved_step = state["step"]
        self.step, self.epoch, self.history = state["step"], position.epoch, position.segments
        self._seed_views()
        trained = sum(s.batches * s.layout.world_size * s.layout.batch_size for s in self.history)
        log.info("resumed from %s: step %d, epoch %d, %d crops of this epoch already trained (%d segment(s))",
                 path, self.step, self.epoch, trained, len(self.history))

    def _checked_position(self, path: Path, state: dict) -> EpochPosition:
        """The checkpoint's data position; ConfigError (one line) when this run cannot continue from it."""
        if "data_position" not in state:
            raise ConfigError(f"--resume: {path} holds the data position of an older phileo-train (a list of "
                              "finished tiles); finish that run with the version that wrote it, or start a new run")
        position = EpochPosition.from_dict(state["data_position"])
        data, seed = self.config.data, self.config.run.seed
        if position.segments and (position.crops_per_tile, position.seed) != (data.crops_per_tile, seed):
            raise ConfigError(f"--resume: {path} stopped mid-epoch with --crops-per-tile {position.crops_per_tile} "
                              f"--seed {position.seed}: the rest of the epoch needs the same values")
        if position.segments and position.dataset != fingerprint(self.shards):
            raise ConfigError(f"--resume: {path} stopped mid-epoch on other data ({position.dataset.split(':')[0]} "
                              f"shards) than --shards {self.config.data.shards} ({len(self.shards)} shards)")
        return position

    def _seed_views(self) -> None:
        """Augmentation RNG from (seed, rank, step): reproducible, and valid after resuming on another world size."""
        self.generator.manual_seed(self.config.run.seed * 1_000_003 + self.world.rank * 10_007 + self.step)

    def finished(self) -> bool:
        if self.config.run.steps is not None:
            return self.step >= self.config.run.steps
        return self.epoch >= self.config.run.epochs

    def run(self) -> None:
        self._seed_views()
        if self.world.is_primary:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.json").write_text(json.dumps(self.config.to_dict(), indent=1))
            self.tensorboard = SummaryWriter(str(self.run_dir / "tensorboard"))
        try:
            while not self.finished():
                self.run_epoch()
            if self.last_saved_step != self.step:
                self.save()
        finally:
            if self.tensorboard is not None:
                self.tensorboard.close()

    def _next_epoch(self) -> None:
        self.epoch, self.history, self.plan = self.epoch + 1, (), None

    def run_epoch(self) -> None:
        plan = self._plan(self.epoch, self.history)
        if plan.steps == 0:  # resumed at the very end of an epoch: less than one step was left
            log.info("epoch %d: the %d crops left make less than one step; moving on", self.epoch, plan.dropped)
            self._next_epoch()
            return
        if self.world.is_primary:
            log.info("epoch %d: %d micro-batches per rank; %d crops dropped (the last, partial global batch), "
                     "%d repeated", self.epoch, plan.steps, plan.dropped, plan.repeated)
            with open(self.run_dir / "epochs.jsonl", "a") as file:
                file.write(json.dumps({"epoch": self.epoch, "step": self.step, "micro_batches": plan.steps,
                                       "world_size": self.world.world_size, "dropped_crops": plan.dropped,
                                       "repeated_crops": plan.repeated, "segment": len(plan.history),
                                       "trained_before_crops": plan.total_crops - plan.deal.length}) + "\n")
        self.plan, self.segment_start = plan, self.step
        loader = make_loader(plan, self.world.rank, self.options, self.config.data.num_workers)
        bar = tqdm(total=plan.steps // self.config.optim.grad_accum, disable=not self.world.is_primary,
                   desc=f"epoch {self.epoch}", unit="step")
        completed = self._train_batches(iter(loader), plan.steps, bar)
        bar.close()
        if completed:
            self._next_epoch()

    def _train_batches(self, batches, micro_batches: int, bar: tqdm) -> bool:
        """Train on the epoch's batches; False when --steps ended the run mid-epoch."""
        accum = self.config.optim.grad_accum
        for _ in range(micro_batches // accum):
            if self.finished():
                return False
            started = time.monotonic()
            lr = lr_at(self.step, self.base_lr, self.min_lr, self.config.optim.warmup_steps,
                       self.total_steps)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            metrics, crops, waited = Counter(), 0, 0.0
            for micro in range(accum):
                fetch = time.monotonic()
                batch = next(batches)
                waited += time.monotonic() - fetch
                with self._gradient_sync(micro == accum - 1):
                    terms = self._forward_backward(batch, accum)
                metrics.update({k: v / accum for k, v in terms.items()})
                crops += len(batch["keys"])
                self._account(batch)
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.optim.grad_clip)
            if not torch.isfinite(norm):  # synced gradients: every rank stops at the same step
                raise TrainingDiverged(f"step {self.step + 1}: loss {metrics.get('loss', float('nan')):.4g}, "
                                       "gradient norm not finite; stopped before the optimizer step and any "
                                       "checkpoint of these weights (lower --lr or --grad-clip?)")
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            self._log(dict(metrics), lr, crops, waited, time.monotonic() - started, bar)
            if self.step % self.config.run.ckpt_every == 0:
                self.save()
        return True

    def _gradient_sync(self, sync: bool):
        """Reduce gradients only on the last micro-step of an optimizer step."""
        if self.sharded:
            self.model.set_requires_gradient_sync(sync)
        if sync or self.sharded or not self.world.distributed:
            return contextlib.nullcontext()
        return self.ddp.no_sync()

    def _forward_backward(self, batch: dict, accum: int) -> dict[str, float]:
        device = self.world.device
        image = model_input(batch, device)
        labels = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor) and k not in BAND_KEYS}
        view_a, view_b, target_a, target_b = make_views(image, self.generator)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.amp):
            # one forward over both views (the norms are per sample, so this equals two forwards)
            out_a, out_b = split_views(self.ddp(torch.cat([view_a, view_b])), len(view_a))
        loss, terms = foundation_loss(out_a, out_b, target_a, target_b, labels)
        (loss / accum).backward()
        return terms

    def _account(self, batch: dict) -> None:
        if self.config.run.record_keys:
            self.recorded_keys.extend(f"{key} {crop}" for key, crop in zip(batch["keys"], batch["crop_index"]))

    def _log(self, metrics: dict, lr: float, crops: int, waited: float, elapsed: float, bar: tqdm) -> None:
        self.crops_total += crops
        bar.update(1)
        if self.step % self.config.run.log_every and self.step != self.total_steps:
            return
        metrics = all_reduce_mean(metrics, self.world)  # a collective: every rank logs at the same steps
        if not self.world.is_primary:
            return
        rate = self.crops_total * self.world.world_size / max(time.monotonic() - self.started, 1e-9)
        record = {"step": self.step, "epoch": self.epoch, "lr": lr, "crops_per_s": rate,
                  "data_wait": waited / max(elapsed, 1e-9), **metrics}
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", crops_s=f"{rate:.0f}", wait=f"{record['data_wait']:.0%}")
        with open(self.run_dir / "metrics.jsonl", "a") as file:
            file.write(json.dumps(record) + "\n")
        for name, value in record.items():
            if name not in ("step", "epoch"):
                self.tensorboard.add_scalar(f"train/{name}", value, self.step)

    def save(self) -> None:
        """Checkpoint with the data position (training/data/epoch.py EpochPosition): a few hundred bytes.

        Every rank has trained the same micro-batches, so the position is the same on all of them.
        """
        self.last_saved_step = self.step
        self._write_recorded_keys()
        state = {"step": self.step, "epoch": self.epoch, "data_position": self.position().to_dict(),
                 "config": self.config.to_dict(), "world_size": self.world.world_size}
        keep = self.config.run.keep_checkpoints
        if self.sharded:
            save_sharded_checkpoint(self.run_dir, self.step, self.model, self.optimizer, state,
                                    self.world.is_primary, lambda: barrier(self.world), keep)
            return
        if self.world.is_primary:
            model_state, optimizer_state = get_state_dict(self.model, self.optimizer)
            save_checkpoint(self.run_dir, self.step, state | {"model": model_state, "optimizer": optimizer_state},
                            keep)
        barrier(self.world)


    def _write_recorded_keys(self) -> None:
        if not self.config.run.record_keys:
            return
        folder = Path(self.config.run.record_keys)
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / f"rank{self.world.rank}.txt", "a") as file:
            file.write("".join(f"{key}\n" for key in self.recorded_keys))
        self.recorded_keys = []


def pretrain(config: PretrainConfig) -> None:
    """Entry point of `phileo-train pretrain` (one process per rank under torchrun)."""
    world = init_world()
    # ranks on one machine share its cores
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
    try:
        trainer = Trainer(config, world)
        if config.run.resume:
            trainer.resume()
        trainer.run()
        if world.is_primary:
            log.info("done: %d steps, %d epochs, checkpoints in %s", trainer.step, trainer.epoch,
                     trainer.run_dir / "checkpoints")
    finally:
        shutdown(world)
