"""Tests of training/finetune/metrics.py (hand-worked numbers, masks, exact DDP reduction) and plots.py."""

from __future__ import annotations

import datetime
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from phileo.phileo_bench import IGNORE_CLASS, NUM_LANDCOVER_CLASSES, WORLDCOVER_NAMES
from training.distributed import World
from training.finetune.metrics import ClassificationMetrics, ConfusionMatrix, RegressionMetrics
from training.finetune.plots import (
    LANDCOVER_COLOURS,
    landcover_colours,
    markdown_table,
    rgb_composite,
    save_confusion_matrix,
    save_nshot_curve,
    save_previews,
)

SINGLE = World(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def _approx(value: float) -> pytest.approx:
    return pytest.approx(value, rel=0, abs=1e-12)


# ------------------------------------------------------------------------------------------ regression

# A 2x2 density map worked by hand: errors 0.7, -0.2, -0.2, -0.5.
PRED_2X2 = torch.tensor([[[[0.7, 0.6], [0.4, 0.0]]]], dtype=torch.float64)  # (1,1,2,2)
TARGET_2X2 = torch.tensor([[[0.0, 0.8], [0.6, 0.5]]], dtype=torch.float64)  # (1,2,2): no channel axis


def test_regression_hand_worked_2x2():
    m = RegressionMetrics()
    m.update(PRED_2X2, TARGET_2X2)
    r = m.compute()
    assert r["pixels"] == 4
    assert r["mse"] == _approx((0.49 + 0.04 + 0.04 + 0.25) / 4)  # 0.205
    assert r["rmse"] == _approx(math.sqrt(0.205))
    assert r["mae"] == _approx((0.7 + 0.2 + 0.2 + 0.5) / 4)  # 0.4
    assert r["baseline_zero_mse"] == _approx((0.0 + 0.64 + 0.36 + 0.25) / 4)  # mean t^2 = 0.3125
    assert r["baseline_mean_mse"] == _approx(0.3125 - 0.475**2)  # variance of the targets = 0.086875
    assert r["mean_target"] == _approx(0.475) and r["mean_pred"] == _approx(0.425)
    # > 0.5 is positive: target 0.5 is negative, so (0.7, 0.0) fp, (0.6, 0.8) tp, (0.4, 0.6) fn, (0.0, 0.5) tn
    assert (r["tp"], r["fp"], r["fn"], r["tn"]) == (1, 1, 1, 1)


def test_regression_binary_counts_and_ratios():
    # 10 pixels: 3 tp, 1 fp, 2 fn, 4 tn
    pred = torch.tensor([0.9, 0.8, 0.6, 0.7, 0.1, 0.2, 0.0, 0.3, 0.4, 0.5])
    target = torch.tensor([1.0, 0.9, 0.7, 0.2, 0.8, 0.6, 0.0, 0.1, 0.2, 0.3])
    m = RegressionMetrics()
    m.update(pred.view(1, 2, 5), target.view(1, 1, 2, 5))
    r = m.compute()
    assert (r["tp"], r["fp"], r["fn"], r["tn"]) == (3, 1, 2, 4)
    assert all(isinstance(r[k], int) for k in ("tp", "fp", "fn", "tn", "pixels"))
    assert r["precision"] == _approx(3 / 4)
    assert r["recall"] == _approx(3 / 5)
    assert r["f1"] == _approx(2 * 3 / (2 * 3 + 1 + 2))
    assert r["accuracy"] == _approx(7 / 10)


def test_regression_mask_restricts_every_sum():
    valid = torch.tensor([[[False, True], [True, True]]])  # drop the (0.7, 0.0) pixel
    m = RegressionMetrics()
    m.update(PRED_2X2, TARGET_2X2, valid)
    r = m.compute()
    assert r["pixels"] == 3
    assert r["mse"] == _approx((0.04 + 0.04 + 0.25) / 3)
    assert r["mae"] == _approx(0.9 / 3)
    assert r["baseline_zero_mse"] == _approx(1.25 / 3)
    assert (r["tp"], r["fp"], r["fn"], r["tn"]) == (1, 0, 1, 1)


def test_regression_sums_over_batches_not_mean_of_batch_means():
    # 1 pixel with squared error 1, then 3 exact pixels: mse 1/4 (the original's mean of means gave 1/2).
    m = RegressionMetrics()
    m.update(torch.ones(1, 1, 1, 1), torch.zeros(1, 1, 1, 1))
    m.update(torch.full((1, 1, 1, 3), 0.2), torch.full((1, 1, 1, 3), 0.2))
    assert m.compute()["mse"] == _approx(0.25)
    assert m.compute()["pixels"] == 4


def test_regression_undefined_is_nan_and_reset():
    empty = RegressionMetrics().compute()
    assert empty["pixels"] == 0
    assert all(math.isnan(empty[k]) for k in ("mse", "rmse", "mae", "baseline_mean_mse", "precision", "accuracy"))
    m = RegressionMetrics()
    m.update(torch.zeros(2, 4, 4), torch.ones(2, 4, 4))  # no predicted positives: precision undefined
    r = m.compute()
    assert math.isnan(r["precision"]) and r["recall"] == 0.0 and r["mse"] == 1.0
    m.reset()
    assert m.compute()["pixels"] == 0


def test_regression_shape_mismatch_raises():
    with pytest.raises(ValueError, match="shape"):
        RegressionMetrics().update(torch.zeros(1, 1, 4, 4), torch.zeros(1, 4, 5))


# ----------------------------------------------------------------------------------- confusion matrix

# 3 classes. true/pred pairs: 0->0, 0->0, 0->1, 1->1, 1->2, 2->2, 2->2, 2->1 and one ignored pixel.
CM_TARGET = torch.tensor([[0, 0, 0], [1, 1, 2], [2, 2, IGNORE_CLASS]])
CM_PRED = torch.tensor([[0, 0, 1], [1, 2, 2], [2, 1, 0]])


def test_confusion_hand_worked_3_classes():
    cm = ConfusionMatrix(num_classes=3)
    cm.update(CM_PRED[None], CM_TARGET[None, None])  # (1,H,W) prediction, (1,1,H,W) target
    r = cm.compute()
    assert r["matrix"] == [[2, 1, 0], [0, 1, 1], [0, 1, 2]]  # rows true, columns predicted
    assert r["pixels"] == 8  # the ignored pixel is not counted
    assert r["overall_accuracy"] == _approx(5 / 8)
    # IoU = tp / (row + col - tp): rows (3, 2, 3), cols (2, 3, 3)
    assert r["per_class_iou"] == [_approx(2 / 3), _approx(1 / 4), _approx(1 / 2)]
    assert r["miou"] == _approx((2 / 3 + 1 / 4 + 1 / 2) / 3)  # 17/36
    assert r["per_class_precision"] == [_approx(1.0), _approx(1 / 3), _approx(2 / 3)]
    assert r["per_class_recall"] == [_approx(2 / 3), _approx(1 / 2), _approx(2 / 3)]


def test_confusion_ignore_index_honoured_whatever_the_prediction():
    a, b = ConfusionMatrix(num_classes=3), ConfusionMatrix(num_classes=3)
    a.update(CM_PRED, CM_TARGET)
    pred = CM_PRED.clone()
    pred[2, 2] = 2  # change only the prediction under the ignored pixel
    b.update(pred, CM_TARGET)
    assert a.compute()["matrix"] == b.compute()["matrix"]
    other = ConfusionMatrix(num_classes=3, ignore_index=0)  # a custom ignore index drops class 0 instead
    other.update(CM_PRED[:2], CM_TARGET[:2])
    assert other.compute()["pixels"] == 3


def test_confusion_absent_classes_excluded_from_miou():
    cm = ConfusionMatrix(num_classes=4)
    cm.update(torch.tensor([0, 3]), torch.tensor([0, 0]))  # class 3 only predicted; 1 and 2 absent in both
    r = cm.compute()
    iou = r["per_class_iou"]
    assert iou[0] == _approx(1 / 2) and iou[3] == 0.0
    assert math.isnan(iou[1]) and math.isnan(iou[2])
    assert r["miou"] == _approx(0.25)  # mean of 1/2 and 0, not of four values
    assert math.isnan(r["per_class_recall"][3]) and r["per_class_precision"][3] == 0.0


def test_confusion_defaults_are_landcover_and_bad_classes_raise():
    cm = ConfusionMatrix()
    assert (cm.num_classes, cm.ignore_index) == (NUM_LANDCOVER_CLASSES, IGNORE_CLASS)
    with pytest.raises(ValueError, match="class index"):
        cm.update(torch.tensor([0]), torch.tensor([11]))
    with pytest.raises(ValueError, match="class index"):
        cm.update(torch.tensor([-1]), torch.tensor([0]))
    assert cm.compute()["pixels"] == 0 and math.isnan(cm.compute()["overall_accuracy"])


def test_mave_is_the_mean_over_images_of_the_mean_difference():
    """MAVE against a direct computation, over two batches of unequal size and with a mask."""
    g = torch.Generator().manual_seed(3)
    pred, target = torch.rand(5, 1, 8, 8, generator=g), torch.rand(5, 1, 8, 8, generator=g)
    m = RegressionMetrics()
    m.update(pred[:2], target[:2])
    m.update(pred[2:], target[2:])
    direct = np.mean([abs(pred[i].double().mean() - target[i].double().mean()) for i in range(5)])
    r = m.compute()
    assert r["images"] == 5 and r["mave"] == _approx(float(direct))
    valid = torch.rand(5, 1, 8, 8, generator=g) > 0.5
    valid[3] = False  # an image without a valid pixel has no mean: it is left out
    masked = RegressionMetrics()
    masked.update(pred, target, valid)
    keep = [i for i in range(5) if i != 3]
    direct = np.mean([abs(pred[i][valid[i]].double().mean() - target[i][valid[i]].double().mean()) for i in keep])
    assert masked.compute()["images"] == 4 and masked.compute()["mave"] == _approx(float(direct))


def test_classification_metrics_hand_worked():
    logits = torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 0.0], [0.0, 0.0]])
    target = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.25, 0.75], [0.0, 0.0]])  # the last: no label
    m = ClassificationMetrics(2)
    m.update(logits, target)
    r = m.compute()
    probs = torch.softmax(logits[:3].double(), 1)
    assert r["patches"] == 3 and r["acc"] == _approx(1 / 3)  # argmax 0, 1, 0 against 0, 0, 1
    assert r["mse"] == _approx(float((probs - target[:3]).square().mean()))
    assert r["mae"] == _approx(float((probs - target[:3]).abs().mean()))
    assert r["matrix"] == [[1, 1], [1, 0]] and r["overall_accuracy"] == _approx(1 / 3)


def test_reduce_is_noop_on_one_process():
    # Not distributed: no collective may run (none is initialised here, so one would raise).
    assert not dist.is_initialized()
    m, cm = RegressionMetrics(), ConfusionMatrix(num_classes=3)
    m.update(PRED_2X2, TARGET_2X2)
    cm.update(CM_PRED, CM_TARGET)
    before = (m.compute(), cm.compute())
    assert m.reduce_(SINGLE) is m and cm.reduce_(SINGLE) is cm
    assert (m.compute(), cm.compute()) == before


# ---------------------------------------------------------------------------------- distributed (gloo)


def _dataset() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """7 patches: density prediction/target/mask and land-cover prediction/target with ignored pixels."""
    g = torch.Generator().manual_seed(7)
    pred, target = torch.rand(7, 1, 16, 16, generator=g), torch.rand(7, 1, 16, 16, generator=g)
    valid = torch.rand(7, 1, 16, 16, generator=g) > 0.2
    lc_pred = torch.randint(0, NUM_LANDCOVER_CLASSES, (7, 16, 16), generator=g)
    lc_target = torch.randint(0, NUM_LANDCOVER_CLASSES, (7, 16, 16), generator=g)
    lc_target[torch.rand(7, 16, 16, generator=g) < 0.1] = IGNORE_CLASS
    return pred, target, valid, lc_pred, lc_target


def _class_dataset() -> tuple[torch.Tensor, torch.Tensor]:
    """7 per-patch logits (5 classes) and soft targets; patch 4 has no label (zero vector)."""
    g = torch.Generator().manual_seed(8)
    logits, target = torch.randn(7, 5, generator=g), torch.rand(7, 5, generator=g)
    target = target / target.sum(1, keepdim=True)
    target[4] = 0
    return logits, target


def _evaluate(parts: list[slice], world: World) -> tuple[dict, dict, dict]:
    pred, target, valid, lc_pred, lc_target = _dataset()
    logits, soft = _class_dataset()
    reg, cm, cls = RegressionMetrics(), ConfusionMatrix(), ClassificationMetrics(5)
    for part in parts:
        reg.update(pred[part], target[part], valid[part])
        cm.update(lc_pred[part], lc_target[part])
        cls.update(logits[part], soft[part])
    return reg.reduce_(world).compute(), cm.reduce_(world).compute(), cls.reduce_(world).compute()


# Disjoint, unequal shares: rank 0 patches 0..2 in two batches, rank 1 patches 3..6 in one.
RANK_PARTS = [[slice(0, 1), slice(1, 3)], [slice(3, 7)]]


def _dist_worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    try:
        world = World(rank=rank, world_size=2, local_rank=rank, device=torch.device("cpu"))
        torch.save(_evaluate(RANK_PARTS[rank], world), f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_distributed_reduce_equals_single_process(tmp_path):
    mp.spawn(_dist_worker, args=(str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=2, join=True)
    whole_reg, whole_cm, whole_cls = _evaluate([slice(0, 7)], SINGLE)
    for rank in range(2):
        reg, cm, cls = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert cm == whole_cm  # int64 counts: identical, every derived value included
        assert reg.keys() == whole_reg.keys()
        for key, value in whole_reg.items():  # mave included: per-image sums add up over ranks
            assert reg[key] == pytest.approx(value, rel=0, abs=1e-12), key
        assert cls["matrix"] == whole_cls["matrix"] and cls["patches"] == whole_cls["patches"] == 6
        for key in ("mse", "mae", "acc"):
            assert cls[key] == pytest.approx(whole_cls[key], rel=0, abs=1e-12), key
    assert whole_cm["pixels"] > 0 and whole_reg["pixels"] > 7 * 16 * 16 // 2


# ---------------------------------------------------------------------------------------------- plots


def _png(path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB"))


def _count(pixels: np.ndarray, colour) -> int:
    return int((pixels == np.asarray(colour[:3], dtype=np.uint8)).all(axis=-1).sum())


def test_import_plots_does_not_import_matplotlib():
    code = "import sys, training.finetune.plots; sys.exit('matplotlib' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[1]).returncode == 0


def test_rgb_composite_order_and_percentile_stretch():
    image = np.zeros((10, 10, 10))
    image[0], image[1], image[2] = 0.1, 0.2, 0.3  # B02 blue, B03 green, B04 red
    image[0, 0, 0] = 100.0  # one saturated pixel (< 2 %) must not flatten the stretch
    rgb = rgb_composite(torch.from_numpy(image))
    assert rgb.shape == (10, 10, 3)
    np.testing.assert_allclose(rgb[5, 5], [1.0, 0.5, 0.0], atol=1e-9)  # R, G, B
    np.testing.assert_allclose(rgb[0, 0], [1.0, 0.5, 1.0], atol=1e-9)  # outlier clipped to 1


def test_landcover_colours_fixed_and_ignore_black():
    rgb = landcover_colours(torch.tensor([[0, 4], [IGNORE_CLASS, 10]]))
    assert rgb.dtype == np.uint8
    assert rgb.tolist() == [[[0, 100, 0], [250, 0, 0]], [[0, 0, 0], [250, 230, 160]]]
    assert len(LANDCOVER_COLOURS) == NUM_LANDCOVER_CLASSES


def test_save_confusion_matrix_png(tmp_path):
    matrix = np.diag(np.arange(1, NUM_LANDCOVER_CLASSES + 1) * 100) + 3
    path = save_confusion_matrix(matrix, WORLDCOVER_NAMES, tmp_path / "sub" / "cm.png")
    pixels = _png(path)
    assert pixels.shape[0] > 400 and pixels.shape[1] > 400
    import matplotlib

    # row-normalised: every diagonal cell is >= 0.9 of its row, drawn in the dark end of Blues
    dark = matplotlib.colormaps["Blues"](1.0, bytes=True)
    assert _count(pixels, dark) == 0  # no row is exactly 100 % ...
    assert (pixels.sum(axis=-1) < 200).sum() > 1000  # ... but the diagonal cells are dark
    with pytest.raises(ValueError, match="class names"):
        save_confusion_matrix(matrix, WORLDCOVER_NAMES[:3], tmp_path / "bad.png")


def _patches(n: int) -> torch.Tensor:
    return torch.rand(n, 10, 32, 32, generator=torch.Generator().manual_seed(1)) * 0.3


def test_save_previews_landcover(tmp_path):
    labels = torch.full((5, 32, 32), 7)  # water
    labels[:, :4] = IGNORE_CLASS
    logits = torch.zeros(5, NUM_LANDCOVER_CLASSES, 32, 32)
    logits[:, 4] = 1.0  # predicted built-up everywhere; logits are reduced with argmax
    one = _png(save_previews(_patches(5), labels, logits, "landcover", tmp_path / "one.png", max_rows=1))
    three = _png(save_previews(_patches(5), labels, logits, "landcover", tmp_path / "three.png", max_rows=3))
    assert three.shape[0] > 2 * one.shape[0]  # max_rows honoured: 3 rows of 5 patches vs 1
    assert _count(three, LANDCOVER_COLOURS[7]) > 3 * 5000  # a label panel per row
    assert _count(three, LANDCOVER_COLOURS[4]) > 3 * 5000  # a prediction panel per row


def test_save_previews_regression_fixed_scale(tmp_path):
    import matplotlib

    labels = torch.full((2, 1, 32, 32), 0.5)
    predictions = torch.zeros(2, 1, 32, 32)
    pixels = _png(save_previews(_patches(2), labels, predictions, "roads", tmp_path / "roads.png"))
    viridis = matplotlib.colormaps["viridis"]
    # a uniform 0.5 label must show as the middle of the fixed 0..1 scale, not an auto-scaled extreme
    assert _count(pixels, viridis(0.5, bytes=True)) > 2 * 5000
    assert _count(pixels, viridis(0.0, bytes=True)) > 2 * 5000
    with pytest.raises(ValueError, match="unknown task"):
        save_previews(_patches(2), labels, predictions, "lc", tmp_path / "bad.png")


SWEEP = [
    {"n": 100, "init": "scratch", "rmse": 0.2},
    {"n": 50, "init": "scratch", "rmse": 0.3},
    {"n": 500, "init": "scratch", "rmse": 0.1},
    {"n": 50, "init": "pretrained", "rmse": 0.25},
    {"n": 50, "init": "pretrained", "rmse": 0.15},  # a second seed: averaged
    {"n": 500, "init": "pretrained", "rmse": 0.05},
]


def test_markdown_table():
    assert markdown_table(SWEEP, "rmse") == (
        "| init | n=50 | n=100 | n=500 |\n"
        "|---|---:|---:|---:|\n"
        "| scratch | 0.3000 | 0.2000 | 0.1000 |\n"
        "| pretrained | 0.2000 | - | 0.0500 |\n"
    )


def test_save_nshot_curve_png(tmp_path):
    import matplotlib

    pixels = _png(save_nshot_curve(SWEEP, "rmse", tmp_path / "nshot.png", "roads, RMSE"))
    assert pixels.shape[0] > 200 and pixels.shape[1] > 300
    first, second = (matplotlib.colors.to_rgb(c) for c in ("C0", "C1"))
    for colour in (first, second):  # one marked line per init
        assert _count(pixels, [round(255 * v) for v in colour]) > 50
