"""What a fine-tuning task means to the trainer: model output, loss, metrics, class names.

Losses are the benchmark's: MSE on the raw output for roads/buildings (0..1 density), cross-entropy
for land cover, where pixels with a code outside WorldCover are ignored (the original raised KeyError
on them), and cross-entropy on per-patch class vectors for the classification tasks, with the bench's
class weights unless `--class-weights none` (utils/training_loops.py TrainClassification*).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from phileo.phileo_bench import (
    BENCH_CLASS_WEIGHTS,
    CLASS_NAMES,
    CLASSIFICATION_TASKS,
    IGNORE_CLASS,
    NUM_LANDCOVER_CLASSES,
    REGRESSION_TASKS,
    WORLDCOVER_NAMES,
)
from training.finetune.metrics import ClassificationMetrics, ConfusionMatrix, RegressionMetrics


@dataclass(frozen=True)
class Task:
    name: str
    kind: str  # "regression" | "segmentation" | "classification" (build_task_model's task)
    class_names: tuple[str, ...] = ()
    weights: tuple[float, ...] | None = None  # classification loss weights

    @classmethod
    def of(cls, name: str, class_weights: str = "bench") -> Task:
        if name in REGRESSION_TASKS:
            return cls(name, "regression")
        if name in CLASSIFICATION_TASKS:
            weights = BENCH_CLASS_WEIGHTS[name] if class_weights == "bench" else None
            return cls(name, "classification", CLASS_NAMES[name], weights)
        return cls(name, "segmentation", WORLDCOVER_NAMES)

    @property
    def num_classes(self) -> int | None:
        return len(self.class_names) if self.kind == "classification" else None

    def loss_sum(self, output: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed loss, number of terms): the mean loss is their ratio, exact over batches and ranks."""
        output = output.float()
        if self.kind == "regression":
            return F.mse_loss(output, target, reduction="sum"), torch.tensor(target.numel(), device=target.device)
        if self.kind == "segmentation":
            return (F.cross_entropy(output, target, ignore_index=IGNORE_CLASS, reduction="sum"),
                    (target != IGNORE_CLASS).sum())
        # Class-probability targets, as the bench's vectors: a weighted CE summed over patches, which the bench's
        # mean reduction divides by the batch size (not by the weights); zero vectors (no label) add nothing.
        weight = None if self.weights is None else output.new_tensor(self.weights)
        return F.cross_entropy(output, target, weight=weight, reduction="sum"), (target.sum(1) > 0).sum()

    def tracker(self, device: torch.device) -> RegressionMetrics | ConfusionMatrix | ClassificationMetrics:
        if self.kind == "regression":
            return RegressionMetrics(device=device)
        if self.kind == "segmentation":
            return ConfusionMatrix(NUM_LANDCOVER_CLASSES, device=device)
        return ClassificationMetrics(len(self.class_names), device=device)

    def update(self, tracker, output: torch.Tensor, target: torch.Tensor) -> None:
        tracker.update(output.argmax(1) if self.kind == "segmentation" else output, target)

    def confusion(self, tracker) -> torch.Tensor | None:
        """The confusion counts to draw (None for regression)."""
        if self.kind == "regression":
            return None
        return tracker.confusion.matrix if self.kind == "classification" else tracker.matrix


def summary(results: dict) -> str:
    """The one-line test result of a run."""
    test = results.get("test")
    if not test:
        return "no test split given"
    if "rmse" in test:
        return f"test RMSE {test['rmse']:.4f} (MSE {test['mse']:.5f}, MAVE {test['mave']:.4f})"
    if "acc" in test:
        return f"test accuracy {test['acc']:.4f} over {test['patches']} patches (MSE {test['mse']:.5f})"
    return f"test accuracy {test['overall_accuracy']:.4f}, mIoU {test['miou']:.4f}"
