"""Every tiny model of the PhilEO Bench zoo fine-tunes end to end on generated PhilEO-Bench data, in each task
type it has a head for: dense regression (roads), segmentation (land cover) and per-patch classification. The
224 px models (Prithvi, ResNet-50, SeCo) train on a 224 px build, SatMAE on 128 px patches cropped to 96."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from phileo.models import build
from phileo.models.inputs import input_spec
from tools.phileo_bench_fixture import make_phileo_bench_dataset
from training.config import ConfigError, FinetuneConfig, FinetuneDataConfig, FinetuneOptimConfig, FinetuneRunConfig
from training.distributed import World
from training.finetune.trainer import FinetuneTrainer, run_finetune

CPU = World(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
DENSE = ("baseline-cnn-tiny", "core-unet-nano-tiny", "geoaware-core-nano-tiny", "vit-cnn-tiny", "vit-cnn-gc-tiny",
         "satmae-tiny", "prithvi-100m-tiny", "resnet50-tiny", "seco-resnet50-tiny")
# the classification task builds `<name>-classifier`; core-encoder-nano is the bench's own classifier baseline
CLASSIFIERS = ("geoaware-core-nano-tiny", "vit-cnn-tiny", "vit-cnn-gc-tiny", "satmae-tiny", "prithvi-100m-tiny",
               "resnet50-tiny", "seco-resnet50-tiny", "core-encoder-nano-tiny")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def builds(tmp_path_factory) -> dict[int, Path]:
    """A 128 px and a 224 px phileo-bench build: 1 region, 4 train / 2 val / 2 test patches."""
    root = tmp_path_factory.mktemp("zoo")
    out = {}
    for size in (128, 224):
        make_phileo_bench_dataset(root / f"raw{size}", regions=("japan",), tiles_per_region=1,
                                  patches={"train": 4, "val": 2, "test": 2}, size=size)
        result = subprocess.run([sys.executable, "-m", "sharding.cli", "build", "--source", "phileo-bench",
                                 "--input", str(root / f"raw{size}"), "--output", str(root / f"b{size}")],
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-3000:]
        out[size] = root / f"b{size}"
    return out


def config(data: Path, out: Path, task: str, model: str, **run) -> FinetuneConfig:
    return FinetuneConfig(
        FinetuneRunConfig(out=str(out), task=task, model=model, amp=False, previews=1, **run),
        FinetuneDataConfig(str(data / "train"), str(data / "val"), str(data / "test"), batch_size=2, num_workers=0),
        FinetuneOptimConfig(epochs=1, lr=1e-3, warmup_epochs=0))


def data_for(builds: dict[int, Path], model: str) -> Path:
    with torch.device("meta"):
        return builds[input_spec(build(model)).data_size()]


def finetune_once(builds, tmp_path, task: str, model: str) -> dict:
    results = run_finetune(config(data_for(builds, model), tmp_path / "run", task, model), CPU)
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["model"] == model and saved["epochs_run"] == 1
    assert (tmp_path / "run" / "best.pt").is_file() and (tmp_path / "run" / "last.pt").is_file()
    return results["test"]


@pytest.mark.parametrize("model", DENSE)
@pytest.mark.parametrize("task", ["roads", "landcover"])
def test_dense_zoo_models_finetune_end_to_end(builds, tmp_path, task, model):
    test = finetune_once(builds, tmp_path, task, model)
    crop = input_spec(build(model)).img_size
    if task == "roads":  # every test pixel once (SatMAE: the 96 px centre of each 128 px patch, as the bench)
        assert test["pixels"] == 2 * crop * crop and test["rmse"] >= 0
    else:
        assert 0 <= test["overall_accuracy"] <= 1 and test["pixels"] <= 2 * crop * crop


@pytest.mark.parametrize("model", CLASSIFIERS)
def test_zoo_classifiers_finetune_end_to_end(builds, tmp_path, model):
    test = finetune_once(builds, tmp_path, "buildings-classification", model)
    assert test["patches"] == 2 and 0 <= test["acc"] <= 1


def test_a_classifier_on_a_dense_task_and_a_model_without_one_are_one_line_errors(builds, tmp_path):
    for task, model, message in (("roads", "core-encoder-nano-tiny", "is a per-patch classifier"),
                                 ("roads-classification", "baseline-cnn-tiny", "has no classifier variant")):
        with pytest.raises(ConfigError, match=message) as error:
            FinetuneTrainer(config(builds[128], tmp_path / task, task, model), CPU)
        assert "\n" not in str(error.value)


def test_frozen_mode_keeps_nested_encoder_batchnorm_statistics(builds, tmp_path):
    """geoaware-core-nano's encoder sits under coreunet.stem / coreunet.encoder_blocks: its BatchNorms must stay
    in eval mode (running statistics unchanged) while the decoder's train."""
    checkpoint = tmp_path / "init.pt"
    torch.save({"model": build("geoaware-core-nano-tiny").state_dict()}, checkpoint)
    trainer = FinetuneTrainer(config(builds[128], tmp_path / "run", "roads", "geoaware-core-nano-tiny",
                                     init=str(checkpoint), mode="frozen"), CPU)
    model = trainer.model
    before = {k: v.clone() for k, v in model.state_dict().items() if "running_mean" in k}
    trainer.train_epoch(0)
    after = model.state_dict()
    encoder = [k for k in before if k.startswith(model.encoder_prefixes)]
    others = [k for k in before if not k.startswith(model.encoder_prefixes)]
    assert encoder and others
    assert all(torch.equal(before[k], after[k]) for k in encoder)
    assert any(not torch.equal(before[k], after[k]) for k in others)
