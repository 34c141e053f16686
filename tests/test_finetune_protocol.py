"""The PhilEO Bench fine-tuning protocol: model input conventions, --model-arg, augmentations, classification
tasks and their labels, --warmup-lr-start, MAVE, last.pt / loss.png / lr.png / val_images."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from phileo.bands import MODEL_BANDS
from phileo.models import list_models, register
from phileo.models.inputs import InputSpec, prepare_input
from phileo.phileo_bench import BENCH_CLASS_WEIGHTS, CLASS_NAMES
from tools.phileo_bench_fixture import make_phileo_bench_dataset
from training.config import (
    ConfigError,
    FinetuneConfig,
    FinetuneDataConfig,
    FinetuneOptimConfig,
    FinetuneRunConfig,
    parse_model_args,
)
from training.distributed import World
from training.finetune import augment
from training.finetune.data import collate_patches
from training.finetune.labels import building_level, class_target, has_roads, landcover_fractions
from training.finetune.trainer import FinetuneTrainer, LRSchedule, run_finetune

CPU = World(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
MODEL = "geoaware-unet-tiny"


# ------------------------------------------------------------------ a stand-in zoo model (is_downstream)


class StandIn(nn.Module):
    """A zoo-contract model in miniature: 96 px input centre-cropped from 128 px data, dense or classifier."""

    is_downstream = True

    def __init__(self, output_dim: int = 1, classifier: bool = False, img_size: int = 96, crop_from: int | None = 128):
        super().__init__()
        self.in_chans, self.img_size, self.out_chans = 10, img_size, output_dim
        self.input_spec = InputSpec(img_size=img_size, crop_from=crop_from)
        self.stem = nn.Conv2d(10, 4, 3, padding=1)
        self.head = nn.Linear(4, output_dim) if classifier else nn.Conv2d(4, output_dim, 1)
        self.classifier = classifier
        self.encoder_prefixes, self.pretrained_prefixes, self.pretrained_key_map = ("stem.",), ("stem.",), {}

    def encoder_parameters(self):
        yield from self.stem.parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[1:]) != (10, self.img_size, self.img_size):
            raise AssertionError(f"input {tuple(x.shape)} is not the model's")
        features = torch.relu(self.stem(x))
        return self.head(features.mean((2, 3))) if self.classifier else self.head(features)


for _name, _factory in (("standin-tiny", lambda output_dim=1: StandIn(output_dim)),
                        ("standin-tiny-classifier", lambda output_dim=1: StandIn(output_dim, classifier=True)),
                        ("standin-64", lambda output_dim=1: StandIn(output_dim, img_size=64, crop_from=None))):
    if _name not in list_models():
        register(_name)(_factory)


# ----------------------------------------------------------------------------------------- the data


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    """A small phileo-bench build: 2 regions, 8 train / 4 val / 4 test patches each."""
    root = tmp_path_factory.mktemp("bench")
    make_phileo_bench_dataset(root / "raw", regions=("europe", "japan"), tiles_per_region=1,
                              patches={"train": 8, "val": 4, "test": 4})
    result = subprocess.run([sys.executable, "-m", "sharding.cli", "build", "--source", "phileo-bench", "--input",
                             str(root / "raw"), "--output", str(root / "full")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "full"


def config(bench: Path, out: Path, task: str, model: str = MODEL, augmentations: bool = False, epochs: int = 1,
           **run) -> FinetuneConfig:
    return FinetuneConfig(
        FinetuneRunConfig(out=str(out), task=task, model=model, amp=False, previews=2, **run),
        FinetuneDataConfig(str(bench / "train"), str(bench / "val"), str(bench / "test"), batch_size=8,
                           num_workers=0, augmentations=augmentations),
        FinetuneOptimConfig(epochs=epochs, lr=1e-3, warmup_epochs=1))


def assert_run_files(out: Path, epochs: int) -> None:
    for name in ("best.pt", "last.pt", "loss.png", "lr.png", "metrics.json", "config.json"):
        assert (out / name).stat().st_size > 0, name
    best, last = (torch.load(out / name, weights_only=False) for name in ("best.pt", "last.pt"))
    assert best.keys() == last.keys() == {"model", "epoch", "config"} and last["epoch"] == epochs - 1
    assert best["model"].keys() == last["model"].keys()


# ------------------------------------------------------------------------------------ end to end


@pytest.mark.parametrize("task", ["roads", "landcover"])
def test_dense_tasks_end_to_end(bench, tmp_path, task):
    """Dense regression and segmentation, augmented, with per-epoch validation images."""
    out, epochs = tmp_path / "run", 2 if task == "roads" else 1
    results = run_finetune(config(bench, out, task, augmentations=True, vis_val=True, epochs=epochs), CPU)
    assert_run_files(out, epochs)
    assert sorted(p.name for p in (out / "val_images").iterdir()) == [f"val_{e}.png" for e in range(epochs)]
    test = results["test"]
    if task == "roads":
        assert test["images"] == 8 and 0 <= test["mave"] <= 1 and test["pixels"] == 8 * 128 * 128
    else:
        assert np.array(test["matrix"]).sum() == test["pixels"]


@pytest.mark.parametrize("task", ["landcover-classification", "buildings-classification", "roads-classification"])
def test_classification_tasks_end_to_end(bench, tmp_path, task):
    out = tmp_path / "run"
    results = run_finetune(config(bench, out, task, vis_val=True, augmentations=True), CPU)
    assert_run_files(out, epochs=1)
    assert (out / "val_images" / "val_0.png").stat().st_size > 0
    assert (out / "confusion_matrix.png").stat().st_size > 0
    test, classes = results["test"], len(CLASS_NAMES[task])
    assert test["patches"] == 8 and np.array(test["matrix"]).shape == (classes, classes)
    assert np.array(test["matrix"]).sum() == 8 and test["acc"] == test["overall_accuracy"]
    assert 0 <= test["mse"] <= 1 and 0 <= test["mae"] <= 1
    head = torch.load(out / "best.pt", weights_only=False)["model"]
    assert head["head.2.weight"].shape == (classes, 16)  # pooled deepest encoder map -> Linear


def test_zoo_model_input_spec_crop_and_classifier_variant(bench, tmp_path):
    """A model that takes 96 px centre crops of the 128 px patches, label cropped alike; the classification
    task builds its registered -classifier variant."""
    results = run_finetune(config(bench, tmp_path / "dense", "buildings", model="standin-tiny"), CPU)
    assert results["test"]["pixels"] == 8 * 96 * 96
    trainer = FinetuneTrainer(config(bench, tmp_path / "cls", "roads-classification", model="standin-tiny"), CPU)
    assert trainer.model.classifier and trainer.model.out_chans == 2
    trainer.fit()
    assert trainer.test()["patches"] == 8


def test_model_and_task_kinds_must_match(bench, tmp_path):
    with pytest.raises(ConfigError, match="needs a dense model"):
        FinetuneTrainer(config(bench, tmp_path / "a", "roads", model="standin-tiny-classifier"), CPU)
    with pytest.raises(ConfigError, match="standin-64-classifier is not registered"):
        FinetuneTrainer(config(bench, tmp_path / "b", "roads-classification", model="standin-64"), CPU)


def test_wrong_patch_size_is_refused_in_one_line_before_training(bench, tmp_path):
    with pytest.raises(ConfigError) as error:
        FinetuneTrainer(config(bench, tmp_path / "run", "roads", model="standin-64"), CPU)
    message = str(error.value)
    assert "\n" not in message and "--shards" in message and "128 px patches, but the model takes 64 px" in message
    assert not (tmp_path / "run" / "history.jsonl").exists() and not (tmp_path / "run" / "last.pt").exists()


def test_cli_model_args_are_recorded_and_bad_ones_are_one_line(bench, tmp_path):
    base = [sys.executable, "-m", "training.cli", "finetune", "--task", "buildings", "--model", MODEL,
            "--shards", str(bench / "train"), "--val-shards", str(bench / "val"), "--epochs", "1",
            "--num-workers", "0", "--batch-size", "8", "--no-amp"]
    result = subprocess.run(base + ["--out", str(tmp_path / "ok"), "--model-arg", "dropout=0.1",
                                    "--model-arg", "act_layer=relu", "--warmup-lr-start", "1e-5"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    saved = json.loads((tmp_path / "ok" / "config.json").read_text())
    assert saved["run"]["model_args"] == {"dropout": 0.1, "act_layer": "relu"}
    assert saved["optim"]["warmup_lr_start"] == 1e-5
    result = subprocess.run(base + ["--out", str(tmp_path / "bad"), "--model-arg", "no_such_arg=1"],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "no_such_arg" in result.stderr and "Traceback" not in result.stderr


# ---------------------------------------------------------------------------------------- pieces


def test_model_arg_values_are_json_scalars_else_strings():
    parsed = parse_model_args(["a=1", "b=0.5", "c=true", "d=null", "e=bench", "f=[1, 2]", 'g="x"', "h=1e-3"])
    assert parsed == {"a": 1, "b": 0.5, "c": True, "d": None, "e": "bench", "f": "[1, 2]", "g": '"x"', "h": 1e-3}
    for bad in ("novalue", "=1", "a b=1"):
        with pytest.raises(ConfigError, match="--model-arg"):
            parse_model_args([bad])


def test_classification_labels_from_hand_made_dense_labels():
    codes = np.array([[10, 10, 80, 0], [10, 50, 80, 255]], dtype=np.uint8)  # 0 and 255: no WorldCover class
    fractions = landcover_fractions(codes)
    assert fractions.dtype == np.float32 and fractions.shape == (11,)
    assert fractions[0] == pytest.approx(3 / 6) and fractions[4] == pytest.approx(1 / 6)
    assert fractions[7] == pytest.approx(2 / 6) and fractions.argmax() == 0
    assert not landcover_fractions(np.zeros((4, 4), np.uint8)).any()  # no valid pixel: no label
    density = np.zeros((10, 10), np.float32)
    assert building_level(density) == 0  # no building at all
    density[0, :5] = 0.2  # mean 0.01
    assert building_level(density) == 1
    for mean, level in ((0.09, 1), (0.11, 2), (0.19, 2), (0.21, 3), (0.39, 3), (0.41, 4), (1.0, 4)):
        assert building_level(np.full((4, 4), mean, np.float32)) == level, mean
    assert has_roads(np.zeros((3, 3))) == 0 and has_roads(np.eye(3) * 0.01) == 1
    # stored density with a scale: 255 = full coverage
    target = class_target("buildings-classification", np.full((4, 4), 255 * 0.3, np.float32), density_scale=255)
    assert target.tolist() == [0, 0, 0, 1, 0]
    assert class_target("roads-classification", np.zeros((4, 4), np.uint8)).tolist() == [1, 0]
    assert sum(BENCH_CLASS_WEIGHTS["buildings-classification"]) == pytest.approx(1.0)  # frequencies, not inverse


# buteo 0.9.42 (the version in the bench's environment.yml), buteo/ai/augmentation_utils.py: the channel-last
# (H, W, C) views that AugmentationRotationXY / AugmentationMirrorXY assign with `X[:] = view`.
def buteo_rotate(arr: np.ndarray, k: int) -> np.ndarray:
    if k == 1:
        return arr[::-1, :, :].transpose(1, 0, 2)  # _rotate_90
    if k == 2:
        return arr[::-1, ::-1, :]  # _rotate_180
    return arr[:, ::-1, :].transpose(1, 0, 2)  # _rotate_270


def buteo_mirror(arr: np.ndarray, k: int) -> np.ndarray:
    return {1: arr[:, ::-1, :], 2: arr[::-1, :, :], 3: arr[::-1, ::-1, :]}[k]  # _mirror_horizontal/_vertical/both


def buteo_noise_normal(x: np.ndarray, amount: float, rng: np.random.Generator) -> np.ndarray:
    # augmentation_funcs.py augmentation_noise_normal(per_channel=True, additive=False)
    noise = rng.normal(1, amount, size=x.shape).astype(x.dtype)
    out = x.copy()
    out[:] *= noise
    return out


def test_rotation_and_mirror_match_buteo():
    chw = np.random.default_rng(0).integers(0, 10000, (10, 8, 8)).astype(np.uint16)
    hwc = chw.transpose(1, 2, 0)
    for k in (1, 2, 3):
        expected = buteo_rotate(hwc.copy(), k).transpose(2, 0, 1)
        np.testing.assert_array_equal(augment.rotate(chw, k), expected)
        np.testing.assert_array_equal(augment.mirror(chw, k), buteo_mirror(hwc.copy(), k).transpose(2, 0, 1))
    label = chw[0].astype(np.float32)[None]  # a dense label moves with the image
    np.testing.assert_array_equal(augment.rotate(label, 1)[0], augment.rotate(chw, 1)[0])


def test_noise_multiplies_the_scaled_input_like_buteo():
    dn = torch.from_numpy(np.random.default_rng(1).integers(0, 10000, (3, 10, 16, 16)).astype(np.uint16))
    spec = InputSpec(img_size=8, crop_from=16)
    reflectance = dn.numpy()[1].astype(np.float32) / np.float32(10000)  # callback_preprocess
    field = np.random.default_rng(2).normal(1, 0.05, size=(10, 16, 16)).astype(np.float32)
    batch = {"noise": torch.from_numpy(field[None]), "noise_index": torch.tensor([1])}
    x = augment.apply_noise(prepare_input(dn, spec), batch, spec)
    expected = buteo_noise_normal(reflectance, 0.05, np.random.default_rng(2))[:, 4:12, 4:12]
    np.testing.assert_array_equal(x[1].numpy(), expected)  # the crop of the noised reflectance, bit for bit
    np.testing.assert_array_equal(x[0].numpy(), prepare_input(dn, spec)[0].numpy())  # others untouched
    prithvi = InputSpec(bands=("B02", "B03", "B04", "B8A", "B11", "B12"), img_size=None, normalize="prithvi")
    picked = augment.apply_noise(prepare_input(dn, prithvi), batch, prithvi)[1] / prepare_input(dn, prithvi)[1]
    np.testing.assert_allclose(picked.numpy(), field[[MODEL_BANDS.index(b) for b in prithvi.bands]], rtol=1e-5)


def test_draws_follow_the_bench_probabilities_and_repeat():
    rng = np.random.default_rng(5)
    draws = [augment.draw(rng) for _ in range(20000)]
    for field in ("rotate", "mirror"):
        values = np.array([getattr(d, field) for d in draws])
        assert abs((values > 0).mean() - 0.2) < 0.01
        shares = np.bincount(values[values > 0], minlength=4)[1:] / (values > 0).sum()
        assert np.abs(shares - 1 / 3).max() < 0.03  # k in {1, 2, 3}, uniform
    amounts = np.array([d.noise for d in draws if d.noise is not None])
    assert abs(len(amounts) / 20000 - 0.2) < 0.01 and 0 <= amounts.min() and amounts.max() < 0.1
    patches = [{"s2": np.full((10, 4, 4), i, np.uint16), "target": np.zeros(2, np.float32), "key": str(i)}
               for i in range(30)]
    stage = pickle.loads(pickle.dumps(augment.Augment(seed=1, epoch=0, rank=0, dense_target=False)))
    first, again = list(stage(iter(patches))), list(stage(iter(patches)))
    assert all(np.array_equal(a["s2"], b["s2"]) and (a["noise"] is None) == (b["noise"] is None)
               for a, b in zip(first, again))
    assert any(p["noise"] is not None for p in first)
    assert all(p["target"] is q["target"] for p, q in zip(first, patches))  # classification labels untouched
    other = list(augment.Augment(seed=1, epoch=1, rank=0, dense_target=False)(iter(patches)))
    assert [p["noise"] is None for p in other] != [p["noise"] is None for p in first]
    batch = collate_patches([p | {"url": "u", "repeat": False} for p in first[:10]])
    noised = [i for i, p in enumerate(first[:10]) if p["noise"] is not None]
    assert batch["noise_index"].tolist() == noised and batch["noise"].shape == (len(noised), 10, 4, 4)


def test_warmup_lr_start_rises_geometrically_to_the_lr():
    schedule = LRSchedule(1e-3, warmup_epochs=2, gamma=10, kind="none", min_lr=0, start=1e-5)
    assert [schedule.for_epoch(e) for e in range(4)] == pytest.approx([1e-5, 1e-4, 1e-3, 1e-3])
    default = LRSchedule(1e-3, warmup_epochs=2, gamma=10, kind="none", min_lr=0)
    assert [default.for_epoch(e) for e in range(3)] == pytest.approx([1e-5, 1e-4, 1e-3])
    with pytest.raises(ConfigError, match="--warmup-lr-start"):
        FinetuneOptimConfig(lr=1e-3, warmup_lr_start=1e-2)



@pytest.mark.parametrize("name", ["geoaware-unet-tiny", "phileo-vit-tiny", "vit-upernet-tiny"])
def test_classifier_heads_load_the_pretrained_encoder(name):
    """The PhilEO families' classifiers: the encoder loads from a pretraining state dict (all keys), frozen mode
    leaves only the head trainable, the output is one logit vector per patch."""
    from phileo.models import build, build_task_model

    torch.manual_seed(0)
    pretrained = build(name).state_dict()
    model = build_task_model(name, "classification", pretrained, freeze_encoder=True, num_classes=3)
    assert model(torch.rand(2, 10, 128, 128)).shape == (2, 3)
    own = model.state_dict()
    encoder = [k for k in own if k.startswith(model.encoder_prefixes)]
    source = {k.replace("encoder.", "vit_encoder.", 1) if name == "phileo-vit-tiny" else k: v
              for k, v in pretrained.items()}
    assert encoder and all(torch.equal(own[k], source[k]) for k in encoder)
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    assert trainable and not any(k.startswith(model.encoder_prefixes) for k in trainable)


@pytest.mark.slow
def test_torchrun_two_ranks_classification_with_augmentations(bench, tmp_path):
    """DDP (gloo): every parameter that trains gets a gradient (no unused-parameter error), test metrics are
    exact totals over the ranks."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "training.cli", "finetune", "--task", "buildings-classification", "--model", MODEL,
               "--out", str(tmp_path / "run"), "--shards", str(bench / "train"), "--val-shards", str(bench / "val"),
               "--test-shards", str(bench / "test"), "--epochs", "2", "--warmup-epochs", "0", "--batch-size", "4",
               "--num-workers", "1", "--no-amp", "--augmentations"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["test"]["patches"] == 8
    assert np.array(metrics["test"]["matrix"]).sum() == 8
