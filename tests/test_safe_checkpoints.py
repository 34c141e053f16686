"""Sharded checkpoints load without running code from them (training/safe_dcp.py)."""

from __future__ import annotations

import os
import pickle
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp

from training.checkpoint import load_model_weights
from training.safe_dcp import CheckpointError, load_into


def _sharded(path) -> dict:
    state = {"model": {"w": torch.randn(3, 4), "b": torch.zeros(2, dtype=torch.bfloat16)},
             "optimizer": {"state": {0: {"step": torch.tensor(3.0)}}}, "epoch": 7}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
        dcp.save(state, checkpoint_id=str(path))
    return state


def test_a_real_sharded_checkpoint_loads_whole_and_into_a_state(tmp_path):
    state = _sharded(tmp_path / "ckpt")
    weights = load_model_weights(tmp_path / "ckpt")
    assert set(weights) == {"w", "b"} and torch.equal(weights["w"], state["model"]["w"])
    target = {"model": {"w": torch.zeros(3, 4), "b": torch.ones(2, dtype=torch.bfloat16)},
              "optimizer": {"state": {0: {"step": torch.tensor(0.0)}}}, "epoch": 0}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        load_into(target, tmp_path / "ckpt")
    assert torch.equal(target["model"]["w"], state["model"]["w"]) and target["epoch"] == 7  # a byte item
    assert target["optimizer"]["state"][0]["step"].item() == 3.0


class _Planted:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_planted_metadata_pickle_is_refused_and_never_runs(tmp_path):
    _sharded(tmp_path / "ckpt")
    marker = tmp_path / "ran"
    (tmp_path / "ckpt" / ".metadata").write_bytes(pickle.dumps(_Planted(str(marker))))
    with pytest.raises(CheckpointError, match=r"\.metadata: asks for posix.system"):
        load_model_weights(tmp_path / "ckpt")
    assert not marker.exists()


class HyperParameters(dict):
    """Stands for lightning's AttributeDict: a class that only unpickling by import could rebuild."""


def test_published_weight_file_formats_load_and_others_are_refused(tmp_path):
    """Flat (Prithvi, torchvision), under "model" with an argparse.Namespace (SatMAE), under "state_dict"
    (lightning); a file pickling anything else, or holding no tensors, is one line naming it."""
    import argparse

    from training.checkpoint import load_model_weights
    from training.config import CheckpointError

    weights = {"a.weight": torch.ones(2), "b.bias": torch.zeros(1)}
    files = {"flat.pt": weights, "satmae.pth": {"model": weights, "args": argparse.Namespace(lr=1e-3)},
             "seco.ckpt": {"state_dict": weights, "epoch": 3}}
    for name, content in files.items():
        torch.save(content, tmp_path / name)
        loaded = load_model_weights(tmp_path / name)
        assert set(loaded) == set(weights) and all(torch.equal(loaded[k], weights[k]) for k in weights)
    torch.save({"state_dict": weights, "hparams": HyperParameters()}, tmp_path / "code.ckpt")
    torch.save({"epoch": 3}, tmp_path / "empty.pt")
    for name, message in (("code.ckpt", "not a readable weights file"), ("empty.pt", "holds no state dict")):
        with pytest.raises(CheckpointError, match=f"{name}: {message}") as error:
            load_model_weights(tmp_path / name)
        assert "\n" not in str(error.value)
