"""Atomic checkpoints (temp + rename), keeping the newest few; loaded with weights_only=True, and
sharded ones through training/safe_dcp.py: no checkpoint can run code when it is loaded.

DDP runs write one file `ckpt-<step>.pt` (rank 0). FSDP runs write a directory
`ckpt-<step>/` holding a torch.distributed.checkpoint (every rank writes its shards) plus
`trainer_state.pt`; it resumes on any number of ranks and `load_model_weights` turns it
into a plain state dict for fine-tuning or export.
"""

from __future__ import annotations

import argparse
import logging
import os
import pickle
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch

from phileo.models.task_heads import checkpoint_state_dict
from training.config import CheckpointError
from training.safe_dcp import load_into, load_whole

log = logging.getLogger(__name__)

PREFIX = "ckpt-"
TRAINER_STATE = "trainer_state.pt"


def checkpoint_path(run_dir: Path, step: int, sharded: bool) -> Path:
    return run_dir / "checkpoints" / f"{PREFIX}{step:09d}{'' if sharded else '.pt'}"


def _prune(folder: Path, keep: int) -> None:
    for old in list_checkpoints(folder.parent)[:-keep]:
        shutil.rmtree(old) if old.is_dir() else old.unlink()


def list_checkpoints(run_dir: Path) -> list[Path]:
    # zero-padded step numbers: name order is step order (the original sorted "epoch_9" after "epoch_10")
    folder = run_dir / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.name.startswith(PREFIX) and not p.name.endswith(".tmp"))


def save_checkpoint(run_dir: Path, step: int, state: dict, keep: int) -> Path:
    """Single-file checkpoint written by one rank; a reader never sees a partial file."""
    path = checkpoint_path(run_dir, step, sharded=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    _prune(path.parent, keep)
    log.info("saved %s", path)
    return path


def save_sharded_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                            trainer_state: dict, is_primary: bool, barrier, keep: int) -> Path:
    """Collective: every rank writes its shards into a temp dir; rank 0 renames it when all are done."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    path = checkpoint_path(run_dir, step, sharded=True)
    tmp = path.with_name(path.name + ".tmp")
    if is_primary:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(tmp))
    barrier()
    if is_primary:
        torch.save(trainer_state, tmp / TRAINER_STATE)
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
        _prune(path.parent, keep)
        log.info("saved %s", path)
    barrier()
    return path


def load_sharded_into(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Load a sharded checkpoint into an (FSDP) model + optimizer on any number of ranks; returns trainer state."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    load_into(state, path)  # never unpickles code from the directory (training/safe_dcp.py)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    return load_checkpoint(path / TRAINER_STATE)


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def load_checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def load_model_weights(path: str | Path) -> Mapping[str, torch.Tensor]:
    """Plain model state dict of a weights file, in one process (fine-tuning, embedding, export).

    Takes this project's checkpoints (a file, or a sharded directory: never unpickles code from it,
    training/safe_dcp.py) and the published files of the PhilEO Bench models: a flat state dict
    (Prithvi_100M.pt, torchvision ResNet-50), one under "model" (SatMAE, which also pickles its
    argparse.Namespace of arguments: allowed, it is plain data) or under "state_dict" (a lightning file).
    Anything else that needs unpickling is refused in one line naming the file.
    """
    path = Path(path)
    if path.is_dir():
        return load_whole(path)["model"]
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = load_checkpoint(path)
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as error:
        detail = " ".join(str(error).split())[:200] or type(error).__name__
        raise CheckpointError(f"{path}: not a readable weights file ({detail})") from None
    state = checkpoint_state_dict(checkpoint) if isinstance(checkpoint, Mapping) else None
    if not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: holds no state dict of tensors (at the top, under 'model' or 'state_dict')")
    return state
