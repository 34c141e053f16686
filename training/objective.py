"""Pretraining objective of the PhilEO Geo-Aware U-Net: the two augmented views and the multi-task loss.

Re-implements the original research code (ESA-PhiLab/PhilEO-MajorTOM @ b883970: `loss/losses.py` and the
per-step augmentation in `train_model_ddp.py:326-355`) with its bugs fixed:

* Views (train_model_ddp.py:332-339): torchvision's flip / RandomErasing transforms applied to a 4-D
  batch take ONE decision, ONE rectangle and ONE noise tensor for the whole batch. Here every sample gets its
  own flips and rectangle.
* Views (train_model_ddp.py:327,333): the original appended a ones "mask" channel that was flipped but never
  erased, so `recon * mask` was a no-op. We drop it: the reconstruction target is the un-erased flipped view.
* Similarity (loss/losses.py:34-37): `cosine_embedding_loss(..., target=0)` is identically 0 (PyTorch only
  scores targets +1/-1), so the negative term never trained anything. We use target -1, i.e. mean(max(0, cos)).
* Device (loss/losses.py:33): no hard-coded `.cuda()`; every tensor is created on its input's device.
* Precision (train_model_ddp.py runs bf16 autocast with a GradScaler): the loss is computed in float32 with
  autocast disabled, whatever the caller's autocast.
* Not handled here: the cloud mask divided by 10000 (data/majortom.py:117-118, labels [frac_clear, 0, 0, 0])
  is a data-loader bug, and the reconstruction target range (DN/10000, unclipped, vs a sigmoid head) is a
  normalisation choice; both are fixed where the inputs are made, not in the objective.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor

# RandomErasing(p=1, scale=(0.25, 0.5), ratio=(0.3, 3.3), value="random") of the original (train_model_ddp.py:170).
ERASE_SCALE: tuple[float, float] = (0.25, 0.5)
ERASE_RATIO: tuple[float, float] = (0.3, 3.3)
# torchvision's RandomErasing tries 10 candidate rectangles before giving up.
ERASE_ATTEMPTS = 10
# Guards the weighted means against an all-zero-weight batch (0 / eps = 0, not NaN).
WEIGHT_EPS = 1e-8

# Names of the loss terms, in the order they are summed and logged.
TERM_NAMES: tuple[str, ...] = ("recon", "coords", "clouds", "buildings", "landcover", "similarity")
# Label keys needed by foundation_loss: each supervised head has a target and a per-sample weight.
LABEL_KEYS: tuple[str, ...] = (
    "coords", "coords_weight", "clouds", "clouds_weight",
    "buildings", "buildings_weight", "landcover", "landcover_weight",
)


# --------------------------------------------------------------------------------------------- views


def _uniform(n: int, low: float, high: float, generator: torch.Generator | None, device: torch.device) -> Tensor:
    """n float32 draws from U(low, high). Drawn on the generator's device (a generator only feeds its own device)."""
    gen_device = generator.device if generator is not None else device
    u = torch.rand(n, generator=generator, device=gen_device, dtype=torch.float32)
    return (low + (high - low) * u).to(device)


def random_flips(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Per-sample independent vertical and horizontal flips, each with p=0.5 (the original drew one per batch)."""
    b = x.shape[0]
    flip_v = (_uniform(b, 0.0, 1.0, generator, x.device) < 0.5).view(b, 1, 1, 1)
    flip_h = (_uniform(b, 0.0, 1.0, generator, x.device) < 0.5).view(b, 1, 1, 1)
    x = torch.where(flip_v, x.flip(-2), x)
    return torch.where(flip_h, x.flip(-1), x)


def sample_erase_boxes(
    batch: int, height: int, width: int, generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> Tensor:
    """One rectangle per sample, as torchvision's RandomErasing.get_params but vectorised: (B, 4) int64 (i, j, h, w).

    Like torchvision: area ~ U(25%, 50%) of H*W, aspect ratio log-uniform in (0.3, 3.3), h = round(sqrt(A*r)),
    w = round(sqrt(A/r)), keep the first of 10 candidates with h < H and w < W, top-left corner uniform.
    Deviations, so that every sample really gets one 25-50% rectangle: a candidate whose *rounded* area falls
    outside the scale range is also rejected (~0.6% of candidates at 128 px), and when all 10 fail (~1e-7 at 128 px)
    torchvision erases nothing, whereas we fall back to a rectangle of the crop's aspect ratio.
    """
    device = torch.device(device)
    n, total = batch * ERASE_ATTEMPTS, float(height * width)
    area = _uniform(n, *ERASE_SCALE, generator, device).mul_(total).view(batch, ERASE_ATTEMPTS)
    log_r = _uniform(n, math.log(ERASE_RATIO[0]), math.log(ERASE_RATIO[1]), generator, device)
    ratio = log_r.exp().view(batch, ERASE_ATTEMPTS)
    h = torch.round(torch.sqrt(area * ratio))
    w = torch.round(torch.sqrt(area / ratio))
    frac = h * w / total
    ok = (h >= 1) & (w >= 1) & (h < height) & (w < width) & (frac >= ERASE_SCALE[0]) & (frac <= ERASE_SCALE[1])
    first = torch.argmax(ok.to(torch.int8), dim=1, keepdim=True)  # index of the first valid candidate (0 if none)
    h, w, area = h.gather(1, first)[:, 0], w.gather(1, first)[:, 0], area.gather(1, first)[:, 0]
    # Fallback: same aspect as the crop, w clamped so that h*w stays inside the scale range.
    none_ok = ~ok.any(dim=1)
    fb_h = torch.round(torch.sqrt(area * height / width)).clamp(1, height)
    w_lo, w_hi = torch.ceil(ERASE_SCALE[0] * total / fb_h), torch.floor(ERASE_SCALE[1] * total / fb_h)
    fb_w = torch.minimum(torch.maximum(torch.round(area / fb_h), w_lo), w_hi).clamp(1, width)
    h, w = torch.where(none_ok, fb_h, h), torch.where(none_ok, fb_w, w)
    # Top-left corner uniform over the valid positions: i in [0, H-h], j in [0, W-w].
    i = torch.floor(_uniform(batch, 0.0, 1.0, generator, device) * (height - h + 1)).clamp_max(height - h)
    j = torch.floor(_uniform(batch, 0.0, 1.0, generator, device) * (width - w + 1)).clamp_max(width - w)
    return torch.stack([i, j, h, w], dim=1).to(torch.int64)


def boxes_to_mask(boxes: Tensor, height: int, width: int) -> Tensor:
    """(B, 4) boxes (i, j, h, w) -> (B, 1, H, W) bool mask, True inside each sample's rectangle."""
    i, j, h, w = (boxes[:, k, None] for k in range(4))
    rows = torch.arange(height, device=boxes.device)[None, :]
    cols = torch.arange(width, device=boxes.device)[None, :]
    in_rows = (rows >= i) & (rows < i + h)
    in_cols = (cols >= j) & (cols < j + w)
    return (in_rows[:, :, None] & in_cols[:, None, :])[:, None]


def random_erase(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Replace one rectangle per sample by N(0,1) noise (independent per channel and pixel, as value="random")."""
    b, c, hgt, wid = x.shape
    mask = boxes_to_mask(sample_erase_boxes(b, hgt, wid, generator, x.device), hgt, wid)
    gen_device = generator.device if generator is not None else x.device
    noise = torch.randn((b, c, hgt, wid), generator=generator, device=gen_device, dtype=torch.float32)
    return torch.where(mask, noise.to(device=x.device, dtype=x.dtype), x)


def make_views(x: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """x (B,C,H,W) float -> (view_a, view_b, target_a, target_b).

    Each view: per-sample random flips, then one per-sample erased rectangle. target_* is the same flipped view
    without the erasing: the original reconstructs the un-erased image (train_model_ddp.py:332-355).
    """
    if x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"make_views expects a float (B, C, H, W) tensor, got {tuple(x.shape)} {x.dtype}")
    target_a = random_flips(x, generator)
    target_b = random_flips(x, generator)
    return random_erase(target_a, generator), random_erase(target_b, generator), target_a, target_b


# ---------------------------------------------------------------------------------------------- loss


@dataclass(frozen=True)
class LossWeights:
    """Multipliers of the loss terms. Defaults are the original's (losses.py:63-77: clouds and buildings x100)."""

    recon: float = 1.0
    coords: float = 1.0
    clouds: float = 100.0
    buildings: float = 100.0
    landcover: float = 1.0
    similarity: float = 1.0

    def __post_init__(self) -> None:
        # A negative or non-finite weight would silently turn a term into something to maximise / NaN the loss.
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"LossWeights.{f.name} must be a number, got {value!r}")
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"LossWeights.{f.name} must be finite and >= 0, got {value!r}")

    def as_dict(self) -> dict[str, float]:
        return {name: float(getattr(self, name)) for name in TERM_NAMES}


def weighted_mean(per_sample: Tensor, weight: Tensor) -> Tensor:
    """sum(w * l) / max(sum(w), eps): a zero weight removes the sample; all-zero weights give 0, not NaN.

    The original used mean(l * w) (losses.py:18,22), i.e. divided by B, which shrinks a term when labels are
    missing or partially covered (landcover weight = covered fraction) instead of averaging over labelled samples.
    """
    weight = weight.reshape(-1).to(per_sample.dtype)
    if weight.shape != per_sample.shape:
        raise ValueError(f"weight shape {tuple(weight.shape)} does not match batch {tuple(per_sample.shape)}")
    return (per_sample * weight).sum() / weight.sum().clamp_min(WEIGHT_EPS)


def _mse_per_sample(pred: Tensor, target: Tensor) -> Tensor:
    """Mean squared error per sample over all non-batch dims; target may be (B,) for a (B,1) prediction."""
    b = pred.shape[0]
    return (pred.reshape(b, -1) - target.reshape(b, -1)).pow(2).mean(dim=1)


def _soft_ce_per_sample(logits: Tensor, fractions: Tensor) -> Tensor:
    """Cross-entropy against soft class fractions: -sum_k y_k log softmax(z)_k (as CE_none with a prob. target)."""
    return -(fractions * F.log_softmax(logits, dim=1)).sum(dim=1)


def similarity_loss(emb: Tensor, emb_aug: Tensor, alpha: float = 0.5) -> Tensor:
    """The original cossim_loss (losses.py:32-41), fixed.

    (1 + alpha) * mean(1 - cos(e_i, e'_i))            positive pairs: the two views of one crop
    + (1 - alpha) * mean(max(0, cos(e_{i-1}, e'_i)))  negative pairs, = cosine_embedding_loss(target=-1, margin=0)
    + mean ||e_i - e'_i||_2                           kept as in the original

    Fixes: the original's negative target was 0, which PyTorch scores as exactly 0 (loss/losses.py:34-37).
    The original paired
    e'_i with the batch-reversed torch.flip(e, dims=(0,)); with an odd batch its middle sample is then paired with
    its own other view, which the fixed -1 target would push apart. We roll the batch by one instead: for B >= 2
    every negative pair is two different crops, and for B == 1 there is no negative pair (term = 0).
    """
    pos = (1.0 - F.cosine_similarity(emb, emb_aug, dim=1)).mean()
    if emb.shape[0] >= 2:
        neg = F.cosine_similarity(torch.roll(emb, shifts=1, dims=0), emb_aug, dim=1).clamp_min(0.0).mean()
    else:
        neg = emb.new_zeros(())
    # vector_norm has a zero (not NaN) gradient when both views embed identically.
    dist = torch.linalg.vector_norm(emb - emb_aug, dim=1).mean()
    return pos * (1.0 + alpha) + neg * (1.0 - alpha) + dist


def _unpack(out: Sequence, name: str) -> tuple[Tensor, Tensor, tuple[Tensor, ...]]:
    """PhilEO_CNN forward output (recon, embeddings, embeddings_cnn, decoded, heads) -> float32 (recon, emb, heads)."""
    if len(out) != 5 or len(out[4]) != 4:
        raise ValueError(f"{name} must be the model's 5-tuple (recon, emb, emb_cnn, decoded, (4 heads))")
    recon, emb, _emb_cnn, _decoded, heads = out
    return recon.float(), emb.float(), tuple(h.float() for h in heads)


def _head_terms(heads: tuple[Tensor, ...], labels: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Unweighted supervised terms of one view (losses.py:51-54), each a weighted mean over labelled samples."""
    coords, clouds, buildings, landcover = heads
    # losses.py:25-29 averages the lat and lon MSEs, each over 2 columns: the same as the mean over the 4 columns.
    return {
        "coords": weighted_mean(_mse_per_sample(coords, labels["coords"]), labels["coords_weight"]),
        "clouds": weighted_mean(_soft_ce_per_sample(clouds, labels["clouds"]), labels["clouds_weight"]),
        "buildings": weighted_mean(_mse_per_sample(buildings, labels["buildings"]), labels["buildings_weight"]),
        "landcover": weighted_mean(_soft_ce_per_sample(landcover, labels["landcover"]), labels["landcover_weight"]),
    }


def foundation_loss(
    out_a: Sequence, out_b: Sequence, target_a: Tensor, target_b: Tensor, labels: Mapping[str, Tensor],
    weights: LossWeights | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Multi-task pretraining loss of two views of the same crops (the original foundation_loss, losses.py:44-89).

    total = w.recon * recon + w.coords * coords + w.clouds * clouds + w.buildings * buildings
            + w.landcover * landcover + w.similarity * similarity,
    where every term except similarity (a pair term) is the mean of its view-a and view-b values.

    Returns the total (float32 scalar with grad) and a log dict of floats: `loss` (the weighted total) and the
    UNweighted terms `recon`, `coords`, `clouds`, `buildings`, `landcover`, `similarity` (the original logged
    clouds and buildings already x100; we log raw values so they stay comparable when the weights change).
    """
    weights = LossWeights() if weights is None else weights
    missing = [k for k in LABEL_KEYS if k not in labels]
    if missing:
        raise KeyError(f"labels is missing {missing}")
    device_type = target_a.device.type
    # bf16 autocast would otherwise run the reductions / log_softmax in low precision (as the original did).
    with torch.autocast(device_type=device_type, enabled=False):
        recon_a, emb_a, heads_a = _unpack(out_a, "out_a")
        recon_b, emb_b, heads_b = _unpack(out_b, "out_b")
        lab = {k: labels[k].to(device=recon_a.device, dtype=torch.float32) for k in LABEL_KEYS}
        # Plain mean MSE against the un-erased view (losses.py:45-46), averaged over the two views (:63).
        terms = {"recon": 0.5 * (F.mse_loss(recon_a, target_a.float()) + F.mse_loss(recon_b, target_b.float()))}
        per_a, per_b = _head_terms(heads_a, lab), _head_terms(heads_b, lab)
        terms.update({k: 0.5 * (per_a[k] + per_b[k]) for k in per_a})
        terms["similarity"] = similarity_loss(emb_a, emb_b)
        w = weights.as_dict()
        total = torch.stack([w[k] * terms[k] for k in TERM_NAMES]).sum()
    # One device->host sync for all logged values instead of one .item() per term.
    values = torch.stack([total.detach()] + [terms[k].detach() for k in TERM_NAMES]).tolist()
    return total, dict(zip(("loss",) + TERM_NAMES, values))
