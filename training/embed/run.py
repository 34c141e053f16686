"""`phileo-train embed`: every tile of a dataset through a model's `encode`, one row per fragment.

Launch like training (one process, or `torchrun --nproc-per-node N -m training.cli embed ...`). Rank 0
owns the output (lock, embed.json, the list of shards still to do) and tells the other ranks; each rank
embeds its whole shards (training/embed/tiles.py) and writes one part file per shard
(training/embed/output.py); the last collective is the barrier before rank 0 writes the summary.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from phileo.models import build, load_encoder
from phileo.models.inputs import InputSpec, input_spec, prepare_input
from phileo.output_lock import hold_lock
from phileo.urls import redact
from training.checkpoint import load_model_weights
from training.config import CheckpointError, ConfigError, EmbedConfig
from training.data.loader import pipeline_loader
from training.data.shards import ShardInfo, resolve_shards
from training.distributed import World, barrier, init_world, shutdown
from training.embed.output import LOCK, PartWriter, claim_output, run_record, write_summary
from training.embed.rows import rows_table
from training.embed.tiles import EmbedTiles, FragmentRule, cut_fragments, rank_share, tile_image

log = logging.getLogger(__name__)

# Ranks meet only at the start and the end; a rank whose shards took hours longer must not time the others out.
COLLECTIVE_TIMEOUT_MIN = 24 * 60


def read_init(path: str) -> Mapping[str, torch.Tensor]:
    """The model state dict of --init: a phileo-train checkpoint (file or sharded dir) or a published weights file."""
    try:
        return load_model_weights(path)
    except CheckpointError as error:
        raise ConfigError(f"--init {error}") from None


def load_model(name: str, init: str, device: torch.device) -> tuple[torch.nn.Module, InputSpec]:
    """The model with --init's weights, in eval mode; every encoder weight must come from the file."""
    model = build(name)
    if not callable(getattr(model, "encode", None)):
        raise ConfigError(f"--model {name}: has no encode(x) -> (B, D); it cannot make embeddings")
    state = read_init(init)
    try:
        if hasattr(model, "encoder_prefixes"):  # task / zoo models: the pretrained encoder, renamed as they say
            missing, _ = load_encoder(model, state)
            missing = [k for k in missing if k.startswith(model.encoder_prefixes)]
            unexpected = []
        else:  # a pretraining model: its own checkpoint, whole
            result = model.load_state_dict({k.removeprefix("module."): v for k, v in state.items()}, strict=False)
            missing, unexpected = result.missing_keys, result.unexpected_keys
    except RuntimeError as error:  # shape mismatches: another configuration of the family
        detail = " ".join(str(error).split())[:200]
        raise ConfigError(f"--init {init}: does not fit --model {name} ({detail})") from None
    if missing or unexpected:
        raise ConfigError(f"--init {init}: not a {name} checkpoint ({len(missing)} of its weights missing, e.g. "
                          f"{missing[:2]}; {len(unexpected)} unknown, e.g. {unexpected[:2]})")
    return model.to(device).eval(), input_spec(model)


class FragmentEncoder:
    """Batches of `batch_size` fragments across tiles through `model.encode`; hands back whole tiles in order."""

    def __init__(self, model: torch.nn.Module, spec: InputSpec, batch_size: int):
        self.model, self.spec, self.batch_size = model, spec, batch_size
        self.tiles: list[tuple[dict, int]] = []  # (tile, fragments) not yet handed back, in order
        self.todo: list[torch.Tensor] = []  # fragments not yet encoded
        self.todo_count = 0
        self.done: list[np.ndarray] = []  # embeddings not yet handed back
        self.done_count = 0

    def push(self, tile: dict, fragments: torch.Tensor) -> list[tuple[dict, np.ndarray]]:
        self.tiles.append((tile, len(fragments)))
        self.todo.append(fragments)
        self.todo_count += len(fragments)
        while self.todo_count >= self.batch_size:
            self._encode()
        return self._ready()

    def flush(self) -> list[tuple[dict, np.ndarray]]:
        while self.todo_count:
            self._encode()
        return self._ready()

    @torch.inference_mode()
    def _encode(self) -> None:
        queued = torch.cat(self.todo) if len(self.todo) > 1 else self.todo[0]
        batch, rest = queued[: self.batch_size], queued[self.batch_size :]
        self.todo, self.todo_count = ([rest] if len(rest) else []), len(rest)
        embeddings = self.model.encode(prepare_input(batch.clone(), self.spec))
        self.done.append(embeddings.float().cpu().numpy())
        self.done_count += len(batch)

    def _ready(self) -> list[tuple[dict, np.ndarray]]:
        ready = []
        while self.tiles and self.tiles[0][1] <= self.done_count:
            tile, count = self.tiles.pop(0)
            done = np.concatenate(self.done) if len(self.done) > 1 else self.done[0]
            ready.append((tile, done[:count]))
            self.done, self.done_count = [done[count:]], self.done_count - count
        return ready


class PartFiles:
    """The open part files of a rank: a shard's part closes once its end marker came and its tiles are written."""

    def __init__(self, out: Path, shards: list[ShardInfo], bar: tqdm):
        self.out, self.shards, self.bar = out, shards, bar
        self.writers: dict[int, PartWriter] = {}
        self.waiting: dict[int, int] = {}  # tiles sent to the encoder, not yet written
        self.ended: dict[int, tuple[int, int]] = {}  # (tiles, bad) of shards whose last tile was read
        self.rows = 0

    def open(self, shard: int) -> None:
        if shard not in self.writers:
            self.writers[shard], self.waiting[shard] = PartWriter(self.out, shard, self.shards[shard].url), 0

    def end(self, shard: int, tiles: int, bad: int) -> None:
        self.ended[shard] = (tiles, bad)
        self._close_if_done(shard)

    def write(self, ready: Iterable[tuple[dict, np.ndarray]]) -> None:
        for tile, embeddings in ready:
            shard = tile["shard"]
            self.writers[shard].add(rows_table(tile["columns"], embeddings))
            self.rows += len(embeddings)
            self.waiting[shard] -= 1
            self.bar.update(1)
            self._close_if_done(shard)

    def _close_if_done(self, shard: int) -> None:
        if shard in self.ended and self.waiting[shard] == 0:
            self.writers.pop(shard).close(*self.ended.pop(shard))


def embed_rank(config: EmbedConfig, world: World, shards: list[ShardInfo], rank_shards: list[int],
               model: torch.nn.Module, spec: InputSpec) -> int:
    """Embed this rank's shards; returns the rows written."""
    workers = min(config.num_workers, len(rank_shards))  # a worker without a shard would only cost a process
    rule = FragmentRule(config.fragment_size, spec.data_size())
    loader = pipeline_loader(EmbedTiles(shards, rank_shards, workers, rule, config.max_bad_fraction), workers)
    bar = tqdm(total=sum(shards[i].samples for i in rank_shards), unit="tile", desc="embed",
               disable=not world.is_primary)
    parts = PartFiles(Path(config.out), shards, bar)
    encoder = FragmentEncoder(model, spec, config.batch_size)
    for item in loader:
        parts.open(item["shard"])
        if item.get("end"):
            parts.end(item["shard"], item["tiles"], item["bad"])
            continue
        parts.waiting[item["shard"]] += 1
        fragments = cut_fragments(tile_image(item["bands"], world.device), item["windows"], item["size"])
        parts.write(encoder.push({"shard": item["shard"], "columns": item["columns"]}, fragments))
    parts.write(encoder.flush())
    bar.close()
    assert not parts.writers, f"shards left open: {sorted(parts.writers)}"
    return parts.rows


def _agree_on_pending(config: EmbedConfig, world: World, record: dict, stack: contextlib.ExitStack) -> list[int]:
    """Rank 0 takes the lock and claims the output; every rank gets its pending shards, or its one-line error."""
    message, pending = None, None
    if world.is_primary:
        out = Path(config.out)
        try:
            if out.exists() and not out.is_dir():
                raise ConfigError(f"--output {out}: exists and is not a directory")
            out.mkdir(parents=True, exist_ok=True)
            stack.enter_context(hold_lock(out / LOCK, "--output", ConfigError))
            pending = claim_output(out, record)
        except ConfigError as error:
            message = str(error)
    if world.distributed:
        shared = [(message, pending)]
        dist.broadcast_object_list(shared, src=0)
        message, pending = shared[0]
    if message is not None:
        raise ConfigError(message)
    return pending


def embed(config: EmbedConfig) -> dict | None:
    """Entry point of `phileo-train embed` (one process per rank); rank 0 returns the summary."""
    world = init_world(timeout_minutes=COLLECTIVE_TIMEOUT_MIN)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
    started = time.monotonic()
    try:
        shards = resolve_shards(config.shards)
        model, spec = load_model(config.model, config.init, world.device)
        if config.fragment_size is not None and spec.data_size() not in (None, config.fragment_size):
            raise ConfigError(f"--fragment-size {config.fragment_size}: model {config.model} takes "
                              f"{spec.data_size()} px inputs")
        arguments = {"model": config.model, "init": redact(config.init), "fragment_size": config.fragment_size}
        record = run_record(arguments, shards)
        with contextlib.ExitStack() as stack:
            pending = _agree_on_pending(config, world, record, stack)
            rank_shards = rank_share(shards, pending, world.rank, world.world_size)
            rows = embed_rank(config, world, shards, rank_shards, model, spec)
            log.info("rank %d: %d rows from %d shards", world.rank, rows, len(rank_shards))
            barrier(world)
            if world.is_primary:
                return write_summary(Path(config.out), record, time.monotonic() - started, config.max_bad_fraction)
        return None
    finally:
        shutdown(world)
