"""Model input conventions: band selection, scaling and centre crop as the PhilEO Bench loader does them."""

import numpy as np
import pytest
import torch

from phileo.bands import MODEL_BANDS
from phileo.models.inputs import (
    PRITHVI_MEAN,
    PRITHVI_STD,
    SATMAE_MEAN,
    SATMAE_STD,
    InputSpec,
    prepare_input,
    prepare_target,
)


@pytest.fixture
def dn() -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(0).integers(0, 12000, (2, 10, 128, 128), dtype=np.uint16))


def test_reflectance_is_dn_over_10000(dn):
    x = prepare_input(dn, InputSpec())
    assert x.dtype == torch.float32 and x.shape == (2, 10, 128, 128)
    assert torch.equal(x, dn.float() / 10000.0)


def test_satmae_scaling_and_crop_match_the_bench_loader(dn):
    spec = InputSpec(img_size=96, normalize="satmae", crop_from=128)
    x = prepare_input(dn, spec)
    # pb/utils/load_data.py sentinelNormalize + [16:-16, 16:-16] on channel-last float64 arrays
    hwc = dn.numpy().transpose(0, 2, 3, 1).astype(np.float64)
    mean, std = np.array([SATMAE_MEAN[b] for b in MODEL_BANDS]), np.array([SATMAE_STD[b] for b in MODEL_BANDS])
    low, high = mean - 2 * std, mean + 2 * std
    expected = np.clip((hwc - low) / (high - low) * 255.0, 0, 255).astype(np.float32)[:, 16:-16, 16:-16, :]
    np.testing.assert_allclose(x.numpy().transpose(0, 2, 3, 1), expected, rtol=1e-5, atol=2e-3)
    label = torch.arange(2 * 128 * 128, dtype=torch.float32).reshape(2, 1, 128, 128)
    assert torch.equal(prepare_target(label, spec), label[..., 16:-16, 16:-16])
    per_patch = torch.ones(2, 5)
    assert prepare_target(per_patch, spec) is per_patch


def test_prithvi_picks_bands_by_name_and_standardises(dn):
    bands = ("B02", "B03", "B04", "B8A", "B11", "B12")
    x = prepare_input(dn, InputSpec(bands=bands, img_size=None, normalize="prithvi"))
    picked = dn.numpy()[:, [MODEL_BANDS.index(b) for b in bands]].astype(np.float64)
    expected = (picked - np.array(PRITHVI_MEAN)[None, :, None, None]) / np.array(PRITHVI_STD)[None, :, None, None]
    np.testing.assert_allclose(x.numpy(), expected, rtol=1e-5, atol=1e-5)


def test_data_of_the_wrong_size_or_bands_is_a_one_line_error():
    spec = InputSpec(img_size=224)
    with pytest.raises(ValueError, match="train: 128 px patches, but the model takes 224 px"):
        spec.check_data(10, 128, "train")
    with pytest.raises(ValueError, match="6 bands, expected the 10 bands"):
        spec.check_data(6, 224, "train")
    InputSpec(img_size=96, crop_from=128).check_data(10, 128, "train")
