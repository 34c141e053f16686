"""Fine-tuning figures and tables: confusion matrix, prediction previews, loss / lr curves, n-shot curves.

matplotlib is imported inside the functions (and drives an explicit Agg canvas, never pyplot)
so `import training.finetune.plots` stays cheap for the training CLI and works without a display.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from phileo.phileo_bench import IGNORE_CLASS, NUM_LANDCOVER_CLASSES, REGRESSION_TASKS, TASKS

# ESA WorldCover legend colours, in class order (codes 10, 20, ..., 95, 100).
LANDCOVER_COLOURS: tuple[tuple[int, int, int], ...] = (
    (0, 100, 0), (255, 187, 34), (255, 255, 76), (240, 150, 255), (250, 0, 0), (180, 180, 180),
    (240, 240, 240), (0, 100, 200), (0, 150, 160), (0, 207, 117), (250, 230, 160),
)
RGB_CHANNELS = (2, 1, 0)  # B04, B03, B02 in the (B02, B03, B04, B08, ...) input order
DPI = 100


def _to_numpy(x: Any) -> np.ndarray:
    """Tensors (any device, bf16 included) or arrays -> numpy, without importing torch here."""
    if hasattr(x, "detach"):
        x = x.detach().cpu()
        x = x.float() if x.is_floating_point() else x
        return x.numpy()
    return np.asarray(x)


def _new_figure(width: float, height: float, layout: str | None = None):
    """A Figure bound to an Agg canvas: no pyplot global state, no GUI backend."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout=layout)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", bbox_inches="tight")
    return path


# ------------------------------------------------------------------------------------- confusion matrix


def save_confusion_matrix(matrix: Any, class_names: Sequence[str], path: str | Path) -> Path:
    """PNG of a confusion matrix (rows true, columns predicted): colour = fraction of the true class.

    Row-normalising makes rare classes readable next to dominant ones; the raw counts are
    written in every cell so nothing is hidden.
    """
    counts = _to_numpy(matrix).astype(np.int64)
    k = counts.shape[0]
    if counts.shape != (k, k) or len(class_names) != k:
        raise ValueError(f"matrix {counts.shape} does not match {len(class_names)} class names")
    rows = counts.sum(axis=1, keepdims=True)
    norm = np.divide(counts, rows, out=np.zeros(counts.shape), where=rows > 0)
    fig = _new_figure(1.0 + 0.7 * k, 0.6 + 0.7 * k)
    ax = fig.add_subplot()
    image = ax.imshow(norm, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class")
    for (i, j), value in np.ndenumerate(counts):
        ax.text(j, i, str(value), ha="center", va="center", fontsize=6,
                color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xticks(range(k), labels=list(class_names), rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(k), labels=list(class_names), fontsize=7)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    return _save(fig, path)


# ------------------------------------------------------------------------------------------- previews


def rgb_composite(image: Any) -> np.ndarray:
    """(10,H,W) reflectance -> (H,W,3) float in 0..1, stretched by the image's 2nd/98th percentiles.

    A per-image stretch shows dark and bright scenes alike; the percentiles ignore a few saturated
    or no-data pixels that a min/max stretch would let dominate. One range for all three channels
    keeps the colour balance.
    """
    rgb = np.nan_to_num(_to_numpy(image)[list(RGB_CHANNELS)].astype(np.float64)).transpose(1, 2, 0)
    lo, hi = np.percentile(rgb, [2.0, 98.0])
    return np.clip((rgb - lo) / max(hi - lo, 1e-12), 0.0, 1.0)


def landcover_colours(classes: Any) -> np.ndarray:
    """(H,W) class indices -> (H,W,3) uint8 WorldCover colours; IGNORE_CLASS (or any unknown) is black."""
    lut = np.zeros((256, 3), dtype=np.uint8)
    lut[:NUM_LANDCOVER_CLASSES] = LANDCOVER_COLOURS
    classes = _to_numpy(classes).astype(np.int64)
    return lut[np.where((classes >= 0) & (classes < 256), classes, IGNORE_CLASS)]


def _as_maps(x: Any, task: str) -> np.ndarray:
    """Labels or predictions -> (N,H,W); land-cover logits (N,11,H,W) become class maps."""
    x = _to_numpy(x)
    if x.ndim == 4 and task not in REGRESSION_TASKS and x.shape[1] == NUM_LANDCOVER_CLASSES:
        return x.argmax(axis=1)
    return x[:, 0] if x.ndim == 4 else x


def save_previews(images: Any, labels: Any, predictions: Any, task: str, path: str | Path,
                  max_rows: int = 4) -> Path:
    """PNG with one row per patch: input RGB | label | prediction, on fixed colour scales.

    Fixed scales (density 0..1, the 11 WorldCover colours) keep previews comparable between
    epochs and runs; an auto-scaled map would make an all-zero prediction look like structure.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    images, labels, predictions = _to_numpy(images), _as_maps(labels, task), _as_maps(predictions, task)
    n = min(len(images), max_rows)
    if n < 1:
        raise ValueError("no patches to preview")
    fig = _new_figure(7.5, 2.5 * n + (0.6 if task in REGRESSION_TASKS else 1.0), layout="constrained")
    axes = fig.subplots(n, 3, squeeze=False)
    for row in range(n):
        axes[row, 0].imshow(rgb_composite(images[row]))
        mappable = _show_map(axes[row, 1], labels[row], task)
        _show_map(axes[row, 2], predictions[row], task)
    for ax, title in zip(axes[0], ("input RGB", f"label ({task})", "prediction")):
        ax.set_title(title, fontsize=9)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    _add_legend(fig, axes, mappable, task)
    return _save(fig, path)


def _show_map(ax, values: np.ndarray, task: str):
    if task in REGRESSION_TASKS:
        return ax.imshow(values, cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
    return ax.imshow(landcover_colours(values), interpolation="nearest")


def _add_legend(fig, axes, mappable, task: str) -> None:
    """Density colour bar for regression; class swatches (and ignored = black) for land cover."""
    if task in REGRESSION_TASKS:
        fig.colorbar(mappable, ax=axes.ravel().tolist(), location="bottom", shrink=0.6, aspect=40, label="density")
        return
    from matplotlib.patches import Patch

    from phileo.phileo_bench import WORLDCOVER_NAMES

    handles = [Patch(color=np.array(c) / 255, label=name) for c, name in zip(LANDCOVER_COLOURS, WORLDCOVER_NAMES)]
    handles.append(Patch(color="black", label="ignored / no data"))
    fig.legend(handles=handles, loc="outside lower center", ncol=4, fontsize=7)


def save_class_previews(images: Any, targets: Any, logits: Any, class_names: Sequence[str], path: str | Path,
                        max_images: int = 5) -> Path:
    """PNG of per-patch classification: each patch's RGB titled with its true and predicted class.

    The true class is the target vector's argmax (for land cover the dominant class, its share shown).
    """
    images, targets, logits = _to_numpy(images), _to_numpy(targets), _to_numpy(logits)
    n = min(len(images), max_images)
    if n < 1:
        raise ValueError("no patches to preview")
    fig = _new_figure(2.4 * n, 2.9, layout="constrained")
    axes = fig.subplots(1, n, squeeze=False)[0]
    for ax, image, target, logit in zip(axes, images[:n], targets[:n], logits[:n]):
        ax.imshow(rgb_composite(image))
        probabilities = np.exp(logit - logit.max())
        probabilities /= probabilities.sum()
        true, predicted = int(target.argmax()), int(logit.argmax())
        ax.set_title(f"true: {class_names[true]} ({target[true]:.2f})\npred: {class_names[predicted]} "
                     f"({probabilities[predicted]:.2f})", fontsize=7,
                     color="black" if true == predicted else "darkred")
        ax.set_xticks([])
        ax.set_yticks([])
    return _save(fig, path)


def save_task_previews(previews: Sequence[tuple], task: Any, path: str | Path, limit: int) -> Path:
    """Previews of (DN image, target, output) batches of a fine-tuning task (training/finetune/tasks.py Task)."""
    images, targets, outputs = (np.concatenate([_to_numpy(p[i]) for p in previews])[:limit] for i in range(3))
    if task.kind == "classification":
        return save_class_previews(images, targets, outputs, task.class_names, path, max_images=limit)
    return save_previews(images, targets, outputs, task.name, path, max_rows=limit)


# ------------------------------------------------------------------------------------------- curves


def save_curves(history: Sequence[dict], out: str | Path) -> tuple[Path, Path]:
    """loss.png (training and validation loss) and lr.png per epoch, as the bench's plot_curves."""
    epochs = [row["epoch"] for row in history]
    paths = []
    for name, series in (("loss", (("train_loss", "training loss"), ("val_loss", "validation loss"))),
                         ("lr", (("lr", "learning rate"),))):
        fig = _new_figure(6.0, 4.0)
        ax = fig.add_subplot()
        for key, label in series:
            ax.plot(epochs, [row[key] for row in history], marker="o", label=label)
        if name == "lr":
            ax.set_yscale("log")  # the warmup spans gamma**warmup_epochs
        ax.set_xlabel("epoch")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        paths.append(_save(fig, Path(out) / f"{name}.png"))
    return paths[0], paths[1]


# ------------------------------------------------------------------------------------ n-shot results

# x axis of a sweep: the n-shot size (patches per region bucket) or the split ratio (fraction of files)
SWEEP_AXES = {"n": "n (training samples per region)", "p": "P (fraction of each region's training files)"}


def _series(row: dict) -> str:
    """The line a result belongs to: its `series` (model, init, mode of a sweep) or its init."""
    return str(row.get("series") or row["init"])


def _grid(rows: Sequence[dict], metric: str, x: str = "n") -> tuple[list, dict[str, dict[Any, float]]]:
    """Sorted x values and {series: {x: value}} in first-seen order; rows without an `x` value are left out,
    repeats (seeds) are averaged."""
    values: dict[str, dict[Any, list[float]]] = {}
    for row in rows:
        if row.get(x) not in (None, ""):
            values.setdefault(_series(row), {}).setdefault(row[x], []).append(float(row[metric]))
    xs = sorted({value for by_x in values.values() for value in by_x})
    return xs, {series: {v: sum(m) / len(m) for v, m in by_x.items()} for series, by_x in values.items()}


def save_nshot_curve(rows: Sequence[dict], metric: str, path: str | Path, title: str, x: str = "n") -> Path:
    """PNG of metric vs n-shot (log axis, as in the paper) or vs split ratio P (linear), one marked line per
    series (init, or model x init x mode)."""
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    xs, grid = _grid(rows, metric, x)
    fig = _new_figure(6.0, 4.0)
    ax = fig.add_subplot()
    for series, by_x in grid.items():
        points = sorted(by_x)
        ax.plot(points, [by_x[v] for v in points], marker="o", label=series)
    if x == "n":
        ax.set_xscale("log")
    ax.set_xticks(xs)
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel(SWEEP_AXES[x])
    ax.set_ylabel(metric)
    ax.set_title(title)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def _cell(value: float | None) -> str:
    if value is None:
        return "-"
    return "nan" if math.isnan(value) else f"{value:.4f}"


def markdown_table(rows: Sequence[dict], metric: str, x: str = "n") -> str:
    """Markdown table of a sweep: one row per series, one column per n (or P); "-" where a run is missing."""
    xs, grid = _grid(rows, metric, x)
    lines = [
        f"| {'run' if any('series' in row for row in rows) else 'init'} | "
        + " | ".join(f"{x}={value:g}" for value in xs) + " |",
        "|---|" + "---:|" * len(xs),
    ]
    for series, by_x in grid.items():
        lines.append(f"| {series} | " + " | ".join(_cell(by_x.get(value)) for value in xs) + " |")
    return "\n".join(lines) + "\n"
