"""Fine-tuning test metrics for PhilEO Bench: density regression (roads, buildings), land cover and the
per-patch classification tasks.

Both accumulators keep *sums*, never per-batch means: the original averaged per-batch means
over batches and ranks, which weights a short last batch like a full one. Sums over disjoint
test patches add up exactly, so after `reduce_(world)` every rank holds the totals of the
whole test set. Counts are int64 (exact across ranks); real-valued sums are float64.

Undefined ratios (a zero denominator: no pixels, no predicted positives, a class absent from
both target and prediction, ...) are reported as NaN, never 0.0, so "undefined" cannot be
mistaken for "as bad as possible". `json.dumps` writes them as `NaN`.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

from phileo.phileo_bench import IGNORE_CLASS, NUM_LANDCOVER_CLASSES
from training.distributed import World

BINARY_THRESHOLD = 0.5  # as the original: a pixel is "positive" when its density is > 0.5

# Order of the float64 sums and int64 counts of RegressionMetrics.
_SUM_NAMES = ("sq_err", "abs_err", "target", "target_sq", "pred", "image_abs_mean_err")
_COUNT_NAMES = ("pixels", "tp", "fp", "fn", "tn", "images")


def _ratio(num: float, den: float) -> float:
    """num / den, NaN when den == 0 (an undefined metric, not a bad one)."""
    return num / den if den else math.nan


def _drop_channel(x: torch.Tensor) -> torch.Tensor:
    """(B,1,H,W) -> (B,H,W) so predictions and labels with or without a channel axis compare."""
    return x.squeeze(1) if x.dim() == 4 and x.shape[1] == 1 else x


def _all_reduce_(tensors: list[torch.Tensor], world: World) -> list[torch.Tensor]:
    """Sum each tensor over ranks, on world.device (gloo: CPU, NCCL: the rank's GPU)."""
    out = []
    for tensor in tensors:
        tensor = tensor.to(world.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        out.append(tensor)
    return out


class RegressionMetrics:
    """Pixel-level error sums for a density map on the 0..1 scale (paper metric: RMSE = sqrt(mse))."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.sums = torch.zeros(len(_SUM_NAMES), dtype=torch.float64, device=device)
        self.counts = torch.zeros(len(_COUNT_NAMES), dtype=torch.int64, device=device)

    def reset(self) -> None:
        self.sums.zero_()
        self.counts.zero_()

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """Add a batch; `valid` (bool, same shape) restricts every sum and count to the masked pixels.

        State follows the batch's device, so a GPU evaluation loop never syncs with the host here.
        """
        pred, target = _drop_channel(pred).double(), _drop_channel(target).double()
        if pred.shape != target.shape:
            raise ValueError(f"prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
        mave_sum, images = _image_mean_errors(pred, target, valid)
        if valid is not None:
            valid = _drop_channel(valid).to(torch.bool)
            pred, target = pred[valid], target[valid]
        self.sums = self.sums.to(pred.device)
        self.counts = self.counts.to(pred.device)
        self.sums += torch.cat([self._batch_sums(pred, target), mave_sum.view(1)])
        self.counts += torch.cat([self._batch_counts(pred, target), images.view(1)])

    @staticmethod
    def _batch_sums(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        err = pred - target
        return torch.stack([err.square().sum(), err.abs().sum(), target.sum(), target.square().sum(), pred.sum()])

    @staticmethod
    def _batch_counts(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        p, t = pred > BINARY_THRESHOLD, target > BINARY_THRESHOLD
        pixels = torch.tensor(pred.numel(), dtype=torch.int64, device=pred.device)
        return torch.stack([pixels, (p & t).sum(), (p & ~t).sum(), (~p & t).sum(), (~p & ~t).sum()])

    def reduce_(self, world: World) -> RegressionMetrics:
        """Sum the state over ranks in place (no-op on one process); every rank gets the totals. Call once."""
        if world.distributed:
            self.sums, self.counts = _all_reduce_([self.sums, self.counts], world)
        return self

    def compute(self) -> dict[str, float | int]:
        """Test-set metrics from the sums; NaN where undefined (no pixels, no positives)."""
        s = dict(zip(_SUM_NAMES, self.sums.tolist()))
        c = dict(zip(_COUNT_NAMES, self.counts.tolist()))
        n = c["pixels"]
        mse = _ratio(s["sq_err"], n)
        mean_target = _ratio(s["target"], n)
        baseline_zero = _ratio(s["target_sq"], n)
        out: dict[str, float | int] = {
            "mse": mse,
            "rmse": math.sqrt(mse) if n else math.nan,
            "mae": _ratio(s["abs_err"], n),
            "baseline_zero_mse": baseline_zero,
            # variance of the targets: E[t^2] - E[t]^2 (clamped: rounding can make it -1e-18)
            "baseline_mean_mse": max(baseline_zero - mean_target**2, 0.0) if n else math.nan,
            "mean_target": mean_target,
            "mean_pred": _ratio(s["pred"], n),
            # the bench's MAVE (utils/training_loops.py get_metrics): mean over images of
            # |mean(prediction) - mean(label)|, here over the whole test set instead of per-batch means
            "mave": _ratio(s["image_abs_mean_err"], c["images"]),
            "pixels": n,
            "images": c["images"],
        }
        out.update(_binary_metrics(c["tp"], c["fp"], c["fn"], c["tn"]))
        return out


def _image_mean_errors(pred: torch.Tensor, target: torch.Tensor,
                       valid: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum over images of |mean(pred) - mean(target)| (means over each image's valid pixels), and the image count.

    The bench took `outputs.mean(dim=(1, 2))` of (B, 1, H, W) maps: a mean over the channel and the rows,
    leaving one value per column (utils/training_loops.py get_metrics); the per-image mean is what MAVE names.
    A 1-D input is one image.
    """
    images = pred.reshape(pred.shape[0], -1) if pred.dim() > 1 else pred.view(1, -1)
    targets = target.reshape(images.shape)
    weight = (torch.ones_like(images) if valid is None
              else _drop_channel(valid).to(torch.bool).reshape(images.shape).double())
    pixels = weight.sum(1)
    defined = pixels > 0
    diff = ((images - targets) * weight).sum(1)[defined] / pixels[defined]
    return diff.abs().sum(), defined.sum()


def _binary_metrics(tp: int, fp: int, fn: int, tn: int) -> dict[str, float | int]:
    """Precision/recall/F1/accuracy of "density > 0.5" as the original reported them."""
    return {
        "tp": tp, "fp": fp, "fn": fn, "tn": tn,
        "precision": _ratio(tp, tp + fp),
        "recall": _ratio(tp, tp + fn),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "accuracy": _ratio(tp + tn, tp + fp + fn + tn),
    }


class ConfusionMatrix:
    """Exact int64 confusion counts: rows = true class, columns = predicted class."""

    def __init__(self, num_classes: int = NUM_LANDCOVER_CLASSES, ignore_index: int = IGNORE_CLASS,
                 device: torch.device | str = "cpu") -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def reset(self) -> None:
        self.matrix.zero_()

    @torch.no_grad()
    def update(self, pred_classes: torch.Tensor, target_classes: torch.Tensor) -> None:
        """Add a batch of class maps (e.g. logits.argmax(1)); target == ignore_index is skipped.

        Any other out-of-range class raises: silently folding it into another cell would corrupt
        the matrix (one host sync per batch, acceptable for evaluation).
        """
        pred, target = _drop_channel(pred_classes).long(), _drop_channel(target_classes).long()
        if pred.shape != target.shape:
            raise ValueError(f"prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
        keep = target != self.ignore_index
        pred, target = pred[keep], target[keep]
        k = self.num_classes
        if not bool(((pred >= 0) & (pred < k) & (target >= 0) & (target < k)).all()):
            raise ValueError(f"class index outside 0..{k - 1} (and not ignore_index={self.ignore_index})")
        self.matrix = self.matrix.to(pred.device)
        self.matrix += torch.bincount(target * k + pred, minlength=k * k).view(k, k)

    def reduce_(self, world: World) -> ConfusionMatrix:
        """Sum the counts over ranks in place (no-op on one process); exact (int64). Call once."""
        if world.distributed:
            (self.matrix,) = _all_reduce_([self.matrix], world)
        return self

    def compute(self) -> dict[str, object]:
        """Overall accuracy (the paper's land-cover metric), IoU/precision/recall per class, mIoU.

        mIoU averages only classes present in the target or the prediction (IoU defined), so a
        region without e.g. mangroves is not scored 0 for them.
        """
        m = self.matrix.cpu().double()
        tp, true, predicted = m.diag(), m.sum(1), m.sum(0)
        iou = [_ratio(a, b) for a, b in zip(tp.tolist(), (true + predicted - tp).tolist())]
        precision = [_ratio(a, b) for a, b in zip(tp.tolist(), predicted.tolist())]
        recall = [_ratio(a, b) for a, b in zip(tp.tolist(), true.tolist())]
        pixels = int(self.matrix.sum())
        return {
            "overall_accuracy": _ratio(float(tp.sum()), pixels),
            "miou": _nanmean(iou),
            "macro_precision": _nanmean(precision),
            "macro_recall": _nanmean(recall),
            "per_class_iou": iou,
            "per_class_precision": precision,
            "per_class_recall": recall,
            "pixels": pixels,
            "matrix": self.matrix.cpu().tolist(),
        }


def _nanmean(values: list[float]) -> float:
    defined = [v for v in values if not math.isnan(v)]
    return sum(defined) / len(defined) if defined else math.nan


class ClassificationMetrics:
    """Per-patch classification (target: a class vector per patch, soft or one-hot; a zero vector = undefined).

    The bench's metrics (utils/training_loops.py TrainClassificationBuildings.get_metrics): mse and mae between
    the output and the target vector, acc = argmax match; plus the confusion matrix of the argmaxes. The bench
    took mse / mae on the raw logits, which have no fixed scale; here the output is the softmax probabilities.
    Sums (float64) and counts (int64), exact over ranks like the others.
    """

    def __init__(self, num_classes: int, device: torch.device | str = "cpu") -> None:
        self.num_classes = num_classes
        self.sums = torch.zeros(2, dtype=torch.float64, device=device)  # squared and absolute error
        self.counts = torch.zeros(2, dtype=torch.int64, device=device)  # patches, correct argmax
        self.confusion = ConfusionMatrix(num_classes, device=device)

    @torch.no_grad()
    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        if logits.shape != target.shape or logits.dim() != 2:
            raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(target.shape)}: expected (B, classes)")
        defined = target.sum(1) > 0
        error = F.softmax(logits.double(), dim=1)[defined] - target.double()[defined]
        predicted, true = logits.argmax(1)[defined], target.argmax(1)[defined]
        self.sums = self.sums.to(logits.device)
        self.counts = self.counts.to(logits.device)
        self.sums += torch.stack([error.square().sum(), error.abs().sum()])
        self.counts += torch.stack([defined.sum(), (predicted == true).sum()])
        self.confusion.update(predicted, true)

    def reduce_(self, world: World) -> ClassificationMetrics:
        """Sum the state over ranks in place (no-op on one process). Call once."""
        if world.distributed:
            self.sums, self.counts = _all_reduce_([self.sums, self.counts], world)
            self.confusion.reduce_(world)
        return self

    def compute(self) -> dict[str, object]:
        squared, absolute = self.sums.tolist()
        patches, correct = self.counts.tolist()
        values = patches * self.num_classes
        return {"mse": _ratio(squared, values), "mae": _ratio(absolute, values), "acc": _ratio(correct, patches),
                "patches": patches, **self.confusion.compute()}
