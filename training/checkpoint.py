"""Atomic checkpoints (temp + rename), keeping the newest few; loaded with weights_only=True."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)

PATTERN = "ckpt-*.pt"


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"ckpt-{step:09d}.pt"


def save_checkpoint(run_dir: Path, step: int, state: dict, keep: int) -> Path:
    """Write `state` for `step`; a reader never sees a partial file. Older files beyond `keep` go."""
    path = checkpoint_path(run_dir, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    for old in sorted(path.parent.glob(PATTERN))[:-keep]:
        old.unlink()
    log.info("saved %s", path)
    return path


def latest_checkpoint(run_dir: Path) -> Path | None:
    # zero-padded step numbers: name order is step order (the original sorted "epoch_9" after "epoch_10")
    found = sorted((run_dir / "checkpoints").glob(PATTERN))
    return found[-1] if found else None


def load_checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)
