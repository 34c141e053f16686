"""Fine-tuning on PhilEO Bench shards: learning, frozen mode, checkpoint init, metrics, DDP."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from phileo.models import build
from tools.phileo_bench_fixture import make_phileo_bench_dataset
from training.config import ConfigError, FinetuneConfig, FinetuneDataConfig, FinetuneOptimConfig, FinetuneRunConfig
from training.distributed import World
from training.finetune.trainer import FinetuneTrainer, LRSchedule, run_finetune

CPU = World(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
MODEL = "geoaware-unet-tiny"


def shard_cli(*args: str) -> None:
    result = subprocess.run([sys.executable, "-m", "sharding.cli", *args], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    """A full phileo-bench build (train/val/test) of generated raw files."""
    root = tmp_path_factory.mktemp("bench")
    make_phileo_bench_dataset(root / "raw")
    shard_cli("build", "--source", "phileo-bench", "--input", str(root / "raw"), "--output", str(root / "full"))
    return root


def config(bench: Path, out: Path, task: str = "roads", epochs: int = 1, **run) -> FinetuneConfig:
    full = bench / "full"
    return FinetuneConfig(
        FinetuneRunConfig(out=str(out), task=task, model=MODEL, amp=False, previews=2, **run),
        FinetuneDataConfig(str(full / "train"), str(full / "val"), str(full / "test"), batch_size=8, num_workers=0),
        FinetuneOptimConfig(epochs=epochs, lr=1e-2, warmup_epochs=0))


def pretrain_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """A stand-in pretraining checkpoint of this project (same file layout as ckpt-*.pt)."""
    torch.manual_seed(7)
    state = build(MODEL).state_dict()
    torch.save({"model": state, "step": 1}, path)
    return state


def test_learns_roads_better_than_the_mean(bench, tmp_path):
    """The fixture's roads are a band comparison (B04 > B08): the model must beat the test-set mean clearly."""
    results = run_finetune(config(bench, tmp_path / "run", epochs=6), CPU)
    test = results["test"]
    assert test["pixels"] == 24 * 128 * 128  # every test patch of all 6 regions, once
    assert test["mse"] < 0.75 * test["baseline_mean_mse"], test
    assert math.isclose(test["rmse"], math.sqrt(test["mse"]))
    assert test["mse"] < test["baseline_zero_mse"]
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["test"]["rmse"] == test["rmse"] and saved["train_patches"] == 72
    history = [json.loads(line) for line in (tmp_path / "run" / "history.jsonl").read_text().splitlines()]
    assert len(history) == 6 and saved["best_epoch"] == min(history, key=lambda r: r["val_loss"])["epoch"]
    assert Image.open(tmp_path / "run" / "previews.png").size[0] > 100
    assert json.loads((tmp_path / "run" / "config.json").read_text())["run"]["task"] == "roads"


def test_best_weights_are_tested_not_the_last(bench, tmp_path):
    """The original evaluated the last epoch; we keep a copy of the best and test that."""
    trainer = FinetuneTrainer(config(bench, tmp_path / "run", epochs=2), CPU)
    trainer.fit()
    best = {k: v.clone() for k, v in trainer.best_state.items()}
    with torch.no_grad():  # ruin the live weights: the test must not use them
        for param in trainer.model.parameters():
            param.add_(1.0)
    trainer.test()
    for key, value in trainer.model.state_dict().items():
        assert torch.equal(value, best[key]), key


def test_landcover_metrics_and_confusion_matrix(bench, tmp_path):
    results = run_finetune(config(bench, tmp_path / "run", task="landcover", epochs=1), CPU)
    test = results["test"]
    matrix = np.array(test["matrix"])
    assert matrix.shape == (11, 11) and matrix.sum() == test["pixels"] == 24 * 128 * 128
    assert math.isclose(test["overall_accuracy"], np.trace(matrix) / matrix.sum())
    assert 0 <= test["miou"] <= 1
    assert Image.open(tmp_path / "run" / "confusion_matrix.png").size[0] > 100


def test_frozen_mode_leaves_the_encoder_unchanged(bench, tmp_path):
    checkpoint = tmp_path / "ckpt-000000001.pt"
    pretrained = pretrain_checkpoint(checkpoint)
    trainer = FinetuneTrainer(config(bench, tmp_path / "run", init=str(checkpoint), mode="frozen"), CPU)
    trainer.fit()
    state = trainer.model.state_dict()
    encoder = [k for k in state if k.startswith(trainer.model.encoder_prefixes)]
    assert encoder and all(torch.equal(state[k], pretrained[k]) for k in encoder)  # weights and BN statistics
    decoder = [k for k in state if k.startswith("decoder.") and state[k].is_floating_point()]
    assert any(not torch.equal(state[k], pretrained[k]) for k in decoder), "the decoder did not train"


def test_init_maps_every_encoder_weight(bench, tmp_path):
    checkpoint = tmp_path / "ckpt-000000001.pt"
    pretrained = pretrain_checkpoint(checkpoint)
    model = FinetuneTrainer(config(bench, tmp_path / "run", init=str(checkpoint)), CPU).model
    state = model.state_dict()
    encoder = [k for k in state if k.startswith(model.encoder_prefixes)]
    assert len(encoder) > 10 and all(torch.equal(state[k], pretrained[k]) for k in encoder)


def test_warmup_multiplies_by_gamma_each_epoch_then_plateau():
    schedule = LRSchedule(1e-3, warmup_epochs=5, gamma=10, kind="plateau", min_lr=1e-6)
    assert [schedule.for_epoch(e) for e in range(6)] == pytest.approx([1e-8, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3])
    schedule.end_epoch(5, 1.0)
    for epoch in range(6, 13):  # 7 epochs without improvement: patience 6 exceeded
        schedule.end_epoch(epoch, 2.0)
    assert schedule.for_epoch(13) == pytest.approx(1e-4)
    cosine = LRSchedule(1e-3, warmup_epochs=0, gamma=10, kind="cosine", min_lr=0.0)
    rates = [cosine.for_batch(0) for _ in range(21)]
    assert rates[0] == pytest.approx(1e-3) and rates[10] == pytest.approx(5e-4) and rates[20] == pytest.approx(1e-3)


def test_bad_flags_and_wrong_datasets_are_clear_errors(bench, tmp_path):
    with pytest.raises(ConfigError, match="--mode frozen needs --init"):
        FinetuneRunConfig(out="x", task="roads", mode="frozen")
    with pytest.raises(ConfigError, match="--task"):
        FinetuneRunConfig(out="x", task="water")
    result = subprocess.run([sys.executable, "-m", "training.cli", "finetune", "--task", "roads", "--out",
                             str(tmp_path / "r"), "--shards", str(tmp_path / "missing"), "--val-shards", "x"],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "missing" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_torchrun_two_ranks_exact_test_metrics(bench, tmp_path):
    full = bench / "full"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "training.cli", "finetune", "--task", "landcover", "--model", MODEL,
               "--out", str(tmp_path / "run"),
               "--shards", str(full / "train"), "--val-shards", str(full / "val"), "--test-shards",
               str(full / "test"), "--epochs", "1", "--warmup-epochs", "0", "--batch-size", "4",
               "--num-workers", "1", "--no-amp"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    assert np.array(metrics["test"]["matrix"]).sum() == metrics["test"]["pixels"] == 24 * 128 * 128
