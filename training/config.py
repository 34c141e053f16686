"""Pretraining configuration: nested typed dataclasses validated on construction.

CLI flags only override these defaults; the resolved config is saved as config.json in
the run directory and inside every checkpoint.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

from phileo.urls import redact

# Pretraining (peak lr before x sqrt(world size), final lr) of the original scripts: train_model_ddp.py (CNN)
# and train_model_vit_ddp.py (ViT; its schedule never ran: it sets param_group['flr'], line 307).
DEFAULT_LRS = {"cnn": (1e-4, 1e-6), "vit": (3e-5, 1e-8)}


class ConfigError(ValueError):
    """A flag value is invalid; the message names the flag."""


class BadDataError(RuntimeError):
    """More unreadable data than --max-bad-fraction allows, or none readable at all; names the shards."""


class CheckpointError(ValueError):
    """A checkpoint directory that is not one this project loads; the message names the file."""


class TrainingDiverged(RuntimeError):
    """The loss or the gradients became non-finite; the message names the step. Raised before the
    optimizer step, so no checkpoint ever holds the NaN weights it would have made."""


def positive(flag: str, value: float | None, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if value is None or not math.isfinite(value) or value <= 0:  # inf and nan too: they train NaN weights
        raise ConfigError(f"{flag} {value}: expected a positive finite number")


def check_loader(num_workers: int, max_bad_fraction: float) -> None:
    """The loader flags shared by pretraining and fine-tuning."""
    if num_workers < 0:
        raise ConfigError(f"--num-workers {num_workers}: expected 0 or more")
    if not 0 <= max_bad_fraction <= 1:
        raise ConfigError(f"--max-bad-fraction {max_bad_fraction}: expected a fraction in 0..1")


@dataclass
class DataConfig:
    shards: str = ""
    crops_per_tile: int = 16
    crop_size: int = 128
    batch_size: int = 16  # per rank, per micro-step
    num_workers: int = 2  # DataLoader workers per rank
    shuffle_buffer: int = 512  # crops
    shards_in_parallel: int = 4  # shards each worker interleaves, for geographic mixing
    max_bad_fraction: float = 0.01

    def __post_init__(self) -> None:
        if not self.shards:
            raise ConfigError("--shards: required (a manifest.json, a dataset directory, a URL list or a pattern)")
        for flag, value in (("--crops-per-tile", self.crops_per_tile), ("--batch-size", self.batch_size),
                            ("--shuffle-buffer", self.shuffle_buffer), ("--crop-size", self.crop_size),
                            ("--shards-in-parallel", self.shards_in_parallel)):
            positive(flag, value)
        if self.crop_size % 2:
            raise ConfigError(f"--crop-size {self.crop_size}: expected an even number (20 m grid alignment)")
        check_loader(self.num_workers, self.max_bad_fraction)


@dataclass
class OptimConfig:
    lr: float | None = None  # None: the original's per family x sqrt(world size) (DEFAULT_LRS)
    min_lr: float | None = None  # None: the original's per family
    weight_decay: float = 0.01
    warmup_steps: int = 100
    grad_clip: float = 1.0
    grad_accum: int = 1

    def __post_init__(self) -> None:
        positive("--lr", self.lr, allow_none=True)
        positive("--grad-accum", self.grad_accum)
        values = (self.min_lr or 0, self.weight_decay, self.warmup_steps, self.grad_clip)
        if not all(math.isfinite(value) and value >= 0 for value in values):
            raise ConfigError("--min-lr, --weight-decay, --warmup-steps and --grad-clip must be finite and >= 0")

    def resolved_lrs(self, model: str, world_size: int) -> tuple[float, float]:
        """(peak, final) learning rate: flags, else the original's defaults for the model family."""
        family = "vit" if "vit" in model else "cnn"
        base, final = DEFAULT_LRS[family]
        return (self.lr or base * math.sqrt(world_size)), (final if self.min_lr is None else self.min_lr)


@dataclass
class RunConfig:
    out: str = ""
    model: str = "geoaware-unet-44m"
    epochs: int | None = 1
    steps: int | None = None  # optimizer steps; overrides --epochs
    seed: int = 0
    ckpt_every: int = 500
    keep_checkpoints: int = 3
    log_every: int = 10
    record_keys: str | None = None
    resume: bool = False
    amp: bool = True  # bf16 autocast where supported (and bf16 FSDP parameters)
    strategy: str = "ddp"  # or "fsdp": FSDP2 per block, for the 200M/300M models
    activation_checkpointing: bool = False

    def __post_init__(self) -> None:
        if not self.out:
            raise ConfigError("--output: required (the run directory)")
        positive("--epochs", self.epochs, allow_none=self.steps is not None)
        positive("--steps", self.steps, allow_none=True)
        for flag, value in (("--ckpt-every", self.ckpt_every), ("--keep-checkpoints", self.keep_checkpoints),
                            ("--log-every", self.log_every)):
            positive(flag, value)
        if self.strategy not in ("ddp", "fsdp"):
            raise ConfigError(f"--strategy {self.strategy}: expected ddp or fsdp")


@dataclass
class PretrainConfig:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)

    def to_dict(self) -> dict:
        """As saved in config.json and checkpoints: URLs without their credentials (phileo/urls.py)."""
        values = asdict(self)
        values["data"]["shards"] = redact(values["data"]["shards"])
        return values

    @classmethod
    def from_dict(cls, values: dict) -> PretrainConfig:
        return cls(RunConfig(**values["run"]), DataConfig(**values["data"]), OptimConfig(**values["optim"]))


@dataclass(frozen=True)
class BenchConfig:
    """`phileo-train bench-data`: the pretraining loader alone, for a fixed wall time."""

    data: DataConfig  # validated with the same messages as `pretrain`
    seconds: float = 30.0  # streamed after the first batch
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.seconds > 0:
            raise ConfigError(f"--seconds {self.seconds}: expected a positive number")


# ---- fine-tuning (phileo-train finetune / nshot-sweep) ----

# The dense tasks, then the per-patch classification tasks (the bench's lc_classification,
# building_classification and roads_classification; labels: training/finetune/labels.py).
FINETUNE_TASKS = ("roads", "buildings", "landcover", "landcover-classification", "buildings-classification",
                  "roads-classification")
LR_SCHEDULERS = ("none", "plateau", "cosine")
CLASS_WEIGHTS = ("bench", "none")


def parse_model_args(values: tuple[str, ...] | list[str]) -> dict[str, object]:
    """`--model-arg KEY=VALUE` pairs -> factory overrides. A VALUE that is a JSON int, float, bool or null
    becomes that; anything else stays a string (never evaluated)."""
    parsed: dict[str, object] = {}
    for item in values:
        key, sep, text = item.partition("=")
        if not sep or not key.strip() or not key.strip().isidentifier():
            raise ConfigError(f"--model-arg {item!r}: expected KEY=VALUE with KEY a factory argument name")
        parsed[key.strip()] = _json_scalar(text)
    return parsed


def _json_scalar(text: str) -> object:
    try:
        value = json.loads(text)
    except ValueError:
        return text
    if value is None or isinstance(value, (bool, int, float)):
        return value
    return text  # lists, objects and quoted strings stay the text given


@dataclass
class FinetuneRunConfig:
    out: str = ""
    task: str = ""
    model: str = "geoaware-unet-44m"
    init: str | None = None  # a pretraining checkpoint of this project; None: random init
    mode: str = "full"  # "frozen": train the decoder/head only; "full": everything
    seed: int = 123456  # the benchmark's
    amp: bool = True  # bf16 autocast on CUDA; CPU runs stay fp32
    previews: int = 4  # test patches drawn as input | label | prediction
    model_args: dict = field(default_factory=dict)  # --model-arg KEY=VALUE: factory overrides
    class_weights: str = "bench"  # classification loss weights: the bench's class frequencies, or none
    vis_val: bool = False  # val_images/val_{epoch}.png every epoch, as the bench's --vis_val

    def __post_init__(self) -> None:
        if not self.out:
            raise ConfigError("--output: required (the run directory)")
        if self.task not in FINETUNE_TASKS:
            raise ConfigError(f"--task {self.task!r}: expected one of {', '.join(FINETUNE_TASKS)}")
        if self.class_weights not in CLASS_WEIGHTS:
            raise ConfigError(f"--class-weights {self.class_weights!r}: expected bench or none")
        if self.mode not in ("frozen", "full"):
            raise ConfigError(f"--mode {self.mode!r}: expected frozen or full")
        if self.mode == "frozen" and self.init is None:
            raise ConfigError("--mode frozen needs --init CKPT: a frozen random encoder learns nothing")
        if self.previews < 0:
            raise ConfigError(f"--previews {self.previews}: expected 0 or more")


@dataclass
class FinetuneDataConfig:
    shards: str = ""
    val_shards: str = ""
    test_shards: str | None = None
    batch_size: int = 16  # per rank, as the benchmark
    num_workers: int = 2
    shuffle_buffer: int = 256
    max_bad_fraction: float = 0.0  # evaluation must see every test patch
    augmentations: bool = False  # the bench loader's rotation / mirror / noise (training/finetune/augment.py)

    def __post_init__(self) -> None:
        if not self.shards or not self.val_shards:
            raise ConfigError("--shards and --val-shards: both required (train and validation datasets)")
        positive("--batch-size", self.batch_size)
        positive("--shuffle-buffer", self.shuffle_buffer)
        check_loader(self.num_workers, self.max_bad_fraction)


@dataclass
class FinetuneOptimConfig:
    epochs: int = 250
    lr: float | None = None  # None: 1e-3 x sqrt(world size), as the benchmark's DDP script
    weight_decay: float = 0.01
    warmup_epochs: int = 5  # lr / gamma**warmup_epochs, x gamma each epoch (the benchmark's warmup)
    warmup_gamma: float = 10.0
    warmup_lr_start: float | None = None  # None: lr / warmup_gamma**warmup_epochs, as the benchmark
    lr_scheduler: str = "none"
    min_lr: float = 1e-6
    es_patience: int = 50  # epochs without a val-loss improvement before stopping
    es_delta: float = 0.0

    def __post_init__(self) -> None:
        positive("--epochs", self.epochs)
        positive("--lr", self.lr, allow_none=True)
        positive("--warmup-gamma", self.warmup_gamma)
        positive("--warmup-lr-start", self.warmup_lr_start, allow_none=True)
        if self.lr is not None and self.warmup_lr_start is not None and self.warmup_lr_start > self.lr:
            raise ConfigError(f"--warmup-lr-start {self.warmup_lr_start}: above --lr {self.lr}; warmup rises to --lr")
        positive("--es-patience", self.es_patience)
        if self.lr_scheduler not in LR_SCHEDULERS:
            raise ConfigError(f"--lr-scheduler {self.lr_scheduler!r}: expected one of {', '.join(LR_SCHEDULERS)}")
        values = (self.warmup_epochs, self.weight_decay, self.min_lr, self.es_delta)
        if not all(math.isfinite(value) and value >= 0 for value in values):
            raise ConfigError("--warmup-epochs, --weight-decay, --min-lr and --es-delta must be finite and >= 0")


@dataclass
class FinetuneConfig:
    run: FinetuneRunConfig = field(default_factory=FinetuneRunConfig)
    data: FinetuneDataConfig = field(default_factory=FinetuneDataConfig)
    optim: FinetuneOptimConfig = field(default_factory=FinetuneOptimConfig)

    def to_dict(self) -> dict:
        """As saved in config.json and best.pt: URLs without their credentials (phileo/urls.py)."""
        values = asdict(self)
        for name in ("shards", "val_shards", "test_shards"):
            values["data"][name] = redact(values["data"][name]) if values["data"][name] else values["data"][name]
        return values


# ---- embeddings (phileo-train embed) ----

@dataclass
class EmbedConfig:
    model: str = ""
    init: str = ""  # the model's weights: a phileo-train checkpoint (file or sharded dir) or a state-dict file
    shards: str = ""
    out: str = ""
    fragment_size: int | None = None  # None: one row per tile
    batch_size: int = 64  # fragments per forward pass
    num_workers: int = 2  # DataLoader workers per rank (tile decoding)
    max_bad_fraction: float = 0.0  # every tile, or the run fails

    def __post_init__(self) -> None:
        for flag, value in (("--model", self.model), ("--init", self.init), ("--shards", self.shards),
                            ("--output", self.out)):
            if not value:
                raise ConfigError(f"{flag}: required")
        positive("--batch-size", self.batch_size)
        positive("--fragment-size", self.fragment_size, allow_none=True)
        check_loader(self.num_workers, self.max_bad_fraction)
