"""`--augmentations`: the PhilEO Bench training loader's augmentations, as a pipeline stage of the train loader.

The bench (pb/utils/load_data.py `load_data(with_augmentations=True)`) runs, per training patch, after
`callback_preprocess` (so on the model's scaled input, e.g. reflectance = DN / 10000), buteo 0.9.42's
(environment.yml) `AugmentationRotationXY(p=0.2)`, `AugmentationMirrorXY(p=0.2)` and
`AugmentationNoiseNormal(p=0.2)`, each drawn independently (buteo/ai/augmentation_funcs.py; the maths in
buteo/ai/augmentation_utils.py):

* rotation: with probability 0.2, k in {1, 2, 3} (uniform) quarter turns clockwise, image and label alike;
* mirror: with probability 0.2, k in {1, 2, 3} (uniform): 1 flips the width axis, 2 the height axis, 3 both;
* noise: with probability 0.2, amount ~ U[0, 0.1), then every value of the image (each band and pixel) is
  multiplied by its own N(1, amount) draw (multiplicative, per channel; the label is untouched).

For the classification tasks the bench used the image-only AugmentationRotation / AugmentationMirror (the
label is a per-patch vector); its list names 'roads_regression' where roads_classification was meant, which
left that task with the XY variants on a vector label (load_data.py), so here every classification task
takes the image-only ones. Rotations and flips commute with the per-pixel scaling, so they run here on the
uint16 patch (exact); the noise must multiply the *scaled* input, so this stage only draws the noise field
(in the 10-band DN layout) and the trainer multiplies it in after `prepare_input` (`apply_noise`), selecting
and cropping it as the model's input. Every draw comes from one numpy Generator per (seed, epoch, rank,
worker), so a run repeats exactly; buteo's own draws (Python `random` and numba's global RNG) could not.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from phileo.bands import MODEL_BANDS
from phileo.models.inputs import InputSpec, prepare_target
from training.data.loader import worker_position

PROBABILITY = 0.2  # each of the three, as the bench's p=0.2
NOISE_MAX_AMOUNT = 0.1  # buteo AugmentationNoiseNormal max_amount default
_STREAM = 0xA6  # keeps these draws apart from the shuffle's, which share (seed, epoch, rank, worker)


@dataclass(frozen=True)
class Draw:
    """One patch's draw: quarter turns clockwise (0-3), mirror (0 none, 1 width, 2 height, 3 both), noise std."""

    rotate: int = 0
    mirror: int = 0
    noise: float | None = None


def draw(rng: np.random.Generator) -> Draw:
    """The three independent p=0.2 decisions, in the bench's order."""
    rotate = int(rng.integers(1, 4)) if rng.random() < PROBABILITY else 0
    mirror = int(rng.integers(1, 4)) if rng.random() < PROBABILITY else 0
    noise = float(rng.random() * NOISE_MAX_AMOUNT) if rng.random() < PROBABILITY else None
    return Draw(rotate, mirror, noise)


def rotate(array: np.ndarray, k: int) -> np.ndarray:
    """k quarter turns clockwise over the last two axes (buteo `_rotate_arr`, channel-last there)."""
    return np.ascontiguousarray(np.rot90(array, -k, axes=(-2, -1))) if k else array


def mirror(array: np.ndarray, k: int) -> np.ndarray:
    """buteo `_mirror_arr`: 1 flips the width axis, 2 the height axis, 3 both."""
    axes = {0: (), 1: (-1,), 2: (-2,), 3: (-2, -1)}[k]
    return np.ascontiguousarray(np.flip(array, axes)) if axes else array


class Augment:
    """Pipeline stage (picklable): rotates and mirrors `s2` and a dense `target`, attaches a `noise` field."""

    def __init__(self, seed: int, epoch: int, rank: int, dense_target: bool):
        self.seed, self.epoch, self.rank, self.dense_target = seed, epoch, rank, dense_target

    def __call__(self, patches: Iterator[dict]) -> Iterator[dict]:
        worker, _ = worker_position()
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, worker, _STREAM])
        for patch in patches:
            choice = draw(rng)
            s2 = mirror(rotate(patch["s2"], choice.rotate), choice.mirror)
            target = patch["target"]
            if self.dense_target:
                target = mirror(rotate(target, choice.rotate), choice.mirror)
            noise = None
            if choice.noise is not None:
                noise = rng.normal(1.0, choice.noise, size=s2.shape).astype(np.float32)
            yield {**patch, "s2": s2, "target": target, "noise": noise}


def apply_noise(x: torch.Tensor, batch: dict, spec: InputSpec) -> torch.Tensor:
    """Multiply the model input of the noised patches by their fields (bands and crop as the input), in place."""
    if "noise" not in batch:
        return x
    noise = batch["noise"].to(x.device, non_blocking=True)
    if spec.bands != MODEL_BANDS:
        noise = noise[:, [MODEL_BANDS.index(b) for b in spec.bands]]
    x[batch["noise_index"].to(x.device)] *= prepare_target(noise, spec)
    return x
