"""Each model's input convention: which bands, in which order, how scaled, at which size.

Data reaches every model the same way: uint16 digital numbers (reflectance x 10000) of the 10
MODEL_BANDS, channel-first, (B, 10, H, W). A model says what it expects with an `InputSpec`
(attribute `input_spec`, default `InputSpec()`: all 10 bands / 10000 at 128 px), and
`prepare_input` turns a batch into that, on the device, for fine-tuning and embedding alike.
Labels go through `prepare_target` so that a centre crop applies to both.

The normalisations are the PhilEO Bench loader's (pb/utils/load_data.py):
* "reflectance": DN / 10000 (`callback_preprocess`), the PhilEO models and the CNN baselines.
* "satmae": per band, (DN - (mean - 2 std)) / (4 std) x 255, clipped to 0..255 (`sentinelNormalize`).
* "prithvi": per band, (DN - mean) / std with the Prithvi-100M statistics (`preprocess_image_prithvi`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from phileo.bands import MODEL_BANDS, REFLECTANCE_SCALE

# SatMAE statistics (DN) per band, from pb/utils/load_data.py MEANS_SATMAE / STDS_SATMAE (MODEL_BANDS order).
SATMAE_MEAN: dict[str, float] = dict(zip(MODEL_BANDS, (
    1184.3824625, 1120.77120066, 1136.26026392, 1762.59530783, 1263.73947144, 1645.40315151,
    1846.87040806, 1972.62420416, 1732.16362238, 1247.91870117)))
SATMAE_STD: dict[str, float] = dict(zip(MODEL_BANDS, (
    650.2842772, 965.23119807, 948.9819932, 1364.38688993, 1108.06650639, 1258.36394548,
    1233.1492281, 3545.66, 1310.36996126, 1087.6020813)))
# Prithvi-100M statistics (DN) of its six input channels, in its order (utils/Prithvi_100M_config.py).
PRITHVI_MEAN: tuple[float, ...] = (775.2290211032589, 1080.992780391705, 1228.5855250417867, 2497.2022620507532,
                                   2204.2139147975554, 1610.8324823273745)
PRITHVI_STD: tuple[float, ...] = (1281.526139861424, 1270.0297974547493, 1399.4802505642526, 1368.3446143747644,
                                  1291.6764008585435, 1154.505683480695)
NORMALIZATIONS: tuple[str, ...] = ("reflectance", "satmae", "prithvi")


@dataclass(frozen=True)
class InputSpec:
    """What a model consumes. `bands` are picked by name from MODEL_BANDS, in the given order; `crop`
    centre-crops data of `crop_from` px (image and label) before the model; `img_size` is what the
    model then receives (None: any size)."""

    bands: tuple[str, ...] = MODEL_BANDS
    img_size: int | None = 128
    normalize: str = "reflectance"
    crop_from: int | None = None  # e.g. SatMAE: 128 px PhilEO Bench patches cropped to img_size 96

    def __post_init__(self) -> None:
        unknown = [b for b in self.bands if b not in MODEL_BANDS]
        assert not unknown, f"bands {unknown} are not among {MODEL_BANDS}"
        assert self.normalize in NORMALIZATIONS, self.normalize
        assert self.normalize != "prithvi" or len(self.bands) == len(PRITHVI_MEAN)
        assert self.crop_from is None or (self.img_size is not None and self.crop_from >= self.img_size)

    @property
    def in_chans(self) -> int:
        return len(self.bands)

    def data_size(self) -> int | None:
        """The patch size the data must have: crop_from, else img_size."""
        return self.crop_from or self.img_size

    def check_data(self, channels: int, size: int, where: str) -> None:
        """One-line error when data of `channels` x `size` px cannot feed this model."""
        if channels != len(MODEL_BANDS):
            raise ValueError(f"{where}: {channels} bands, expected the {len(MODEL_BANDS)} bands "
                             f"{','.join(MODEL_BANDS)}")
        expected = self.data_size()
        if expected is not None and size != expected:
            raise ValueError(f"{where}: {size} px patches, but the model takes {expected} px "
                             f"(use the {expected} px PhilEO Bench variant, or a model for {size} px)")


def _centre_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
    return x[..., top:top + size, left:left + size]


def prepare_input(dn: torch.Tensor, spec: InputSpec) -> torch.Tensor:
    """(B, 10, H, W) digital numbers (any dtype) -> the model's float32 input (B, len(bands), h, w)."""
    assert dn.ndim == 4 and dn.shape[1] == len(MODEL_BANDS), tuple(dn.shape)
    if spec.bands != MODEL_BANDS:
        dn = dn[:, [MODEL_BANDS.index(b) for b in spec.bands]]
    if spec.crop_from is not None:
        dn = _centre_crop(dn, spec.img_size)
    x = dn.float()
    if spec.normalize == "reflectance":
        return x.div_(REFLECTANCE_SCALE)  # a division, as the bench's np.divide: bit-equal to it
    if spec.normalize == "satmae":
        mean = x.new_tensor([SATMAE_MEAN[b] for b in spec.bands]).view(1, -1, 1, 1)
        std = x.new_tensor([SATMAE_STD[b] for b in spec.bands]).view(1, -1, 1, 1)
        return x.sub_(mean - 2 * std).div_(4 * std).mul_(255.0).clamp_(0.0, 255.0)
    mean = x.new_tensor(PRITHVI_MEAN).view(1, -1, 1, 1)
    std = x.new_tensor(PRITHVI_STD).view(1, -1, 1, 1)
    return x.sub_(mean).div_(std)


def prepare_target(target: torch.Tensor, spec: InputSpec) -> torch.Tensor:
    """A dense label (B, H, W) or (B, 1, H, W) cropped like the input; per-patch labels pass unchanged."""
    if spec.crop_from is None or target.ndim < 3:
        return target
    return _centre_crop(target, spec.img_size)


def input_spec(model: torch.nn.Module) -> InputSpec:
    """The model's declared convention (unwrapping DDP), or the default."""
    model = getattr(model, "module", model)
    return getattr(model, "input_spec", None) or InputSpec(img_size=getattr(model, "img_size", 128))
