"""Geo-Aware U-Net (original PhilEO_CNN), its blocks and the model registry."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn

from phileo.models import GeoAwareUNet, build, list_models, register
from phileo.models.blocks import GaussianDropout2d, ScaleSkip2D

# Key<TAB>shape of every state-dict entry of the ORIGINAL PhilEO_CNN(input_dim=10, depths=[3,3,4,4,5],
# dims=[32,32,64,64,128], img_size=128, latent_dim=1024, activation=GELU), in its order.
ORIGINAL_44M_LISTING = Path(__file__).parent / "data" / "phileo_cnn_44m_state_dict.txt"
INPUT_SHAPE = (10, 128, 128)


def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _flat_outputs(out) -> list[torch.Tensor]:
    reconstruction, embeddings, embeddings_cnn, decoded, predictions = out
    return [reconstruction, embeddings, embeddings_cnn, decoded, *predictions]


@pytest.fixture(scope="module")
def model_44m() -> GeoAwareUNet:
    torch.manual_seed(0)
    return build("geoaware-unet-44m").eval()


@pytest.fixture(scope="module")
def model_tiny() -> GeoAwareUNet:
    torch.manual_seed(0)
    return build("geoaware-unet-tiny").eval()


def test_44m_has_the_paper_parameter_count(model_44m):
    assert _num_params(model_44m) == 43_667_714


def test_200m_has_the_paper_parameter_count():
    with torch.device("meta"):  # counts without allocating 0.9 GB or running the 7 s CPU init
        model = build("geoaware-unet-200m")
    assert _num_params(model) == 223_216_378


def test_44m_state_dict_names_shapes_and_order_equal_the_original(model_44m):
    expected = ORIGINAL_44M_LISTING.read_text().splitlines()
    ours = [f"{name}\t{','.join(map(str, t.shape))}" for name, t in model_44m.state_dict().items()]
    # Same order too: model.parameters() order decides how an original optimizer state maps onto ours.
    assert ours == expected


def test_44m_loads_a_state_dict_with_the_original_names_strictly(model_44m):
    state = {name: torch.randn_like(t) for name, t in model_44m.state_dict().items()}
    model = build("geoaware-unet-44m")
    model.load_state_dict(state, strict=True)
    assert torch.equal(model.stem.conv1.weight, state["stem.conv1.weight"])


@pytest.mark.parametrize("name", ["geoaware-unet-tiny", "geoaware-unet-44m"])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_forward_shapes_and_ranges(name, batch_size, model_44m, model_tiny):
    model = model_44m if name.endswith("44m") else model_tiny
    dims = model.encoder.dims
    with torch.no_grad():
        out = model(torch.rand(batch_size, *INPUT_SHAPE))
    assert len(out) == 5 and len(out[4]) == 4
    reconstruction, embeddings, embeddings_cnn, decoded, (coords, clouds, buildings, landcover) = out
    assert reconstruction.shape == (batch_size, *INPUT_SHAPE)
    assert embeddings.shape == (batch_size, model.num_features)
    assert embeddings_cnn.shape == (batch_size, dims[-1], 8, 8)
    assert decoded.shape == (batch_size, dims[0], 128, 128)
    assert coords.shape == (batch_size, 4) and clouds.shape == (batch_size, 4)
    assert buildings.shape == (batch_size, 1) and landcover.shape == (batch_size, 11)
    for sigmoid_output in (reconstruction, coords, buildings):
        assert sigmoid_output.min() > 0 and sigmoid_output.max() < 1
    assert all(torch.isfinite(t).all() for t in _flat_outputs(out))


def test_forward_features_is_the_encoder_part_of_forward(model_tiny):
    x = torch.rand(2, *INPUT_SHAPE)
    with torch.no_grad():
        features = model_tiny.forward_features(x)
        out = model_tiny(x)
    assert torch.equal(features.embeddings, out.embeddings)
    assert torch.equal(features.embeddings_cnn, out.embeddings_cnn)
    assert all(torch.equal(a, b) for a, b in zip(features.predictions, out.predictions))
    assert [s.shape[-1] for s in features.skips] == [128, 64, 32, 16, 8]


def test_wrong_input_size_is_a_clear_error(model_tiny):
    with pytest.raises(ValueError, match=r"expected input \(B, 10, 128, 128\)"):
        model_tiny(torch.rand(1, 10, 64, 64))


@pytest.mark.parametrize("dropout", [None, 0.3])
def test_tiny_gradient_reaches_every_parameter(dropout):
    """DDP without find_unused_parameters needs every parameter in the pretraining graph."""
    torch.manual_seed(0)
    model = build("geoaware-unet-tiny", dropout=dropout).train()
    loss = sum(t.float().mean() for t in _flat_outputs(model(torch.rand(4, *INPUT_SHAPE))))
    loss.backward()
    no_grad = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []


def test_tiny_covers_both_stage_kinds():
    depths = build("geoaware-unet-tiny").encoder.depths
    assert 1 in depths and max(depths) > 1  # single-block stages and stages with a block scaler


def test_registry_lists_builds_and_overrides():
    assert {"geoaware-unet-tiny", "geoaware-unet-44m", "geoaware-unet-200m"} <= set(list_models())
    model = build("geoaware-unet-tiny", out_chans=3, act_layer="leaky_relu")
    with torch.no_grad():
        reconstruction = model(torch.rand(1, *INPUT_SHAPE)).reconstruction
    assert reconstruction.shape == (1, 3, 128, 128)
    assert isinstance(model.stem.activation, nn.LeakyReLU)


def test_registry_unknown_name_lists_known_models():
    with pytest.raises(ValueError, match="unknown model 'nope'.*geoaware-unet-44m"):
        build("nope")


def test_registry_refuses_duplicate_names():
    with pytest.raises(ValueError, match="already registered"):
        register("geoaware-unet-tiny")(lambda **kw: nn.Identity())


def test_scale_skip_init_has_no_exact_zeros_and_starts_near_identity():
    torch.manual_seed(0)
    scaler = ScaleSkip2D(64)
    params = dict(scaler.named_parameters())
    assert list(params) == ["x_skipscale", "y_skipscale", "y_skipbias", "x_skipbias"]
    assert all((p != 0).all() for p in params.values())
    assert (params["x_skipscale"] - 1).abs().max() < 0.1 and params["x_skipbias"].abs().max() < 0.1


def test_gaussian_dropout_keeps_everything_when_nothing_is_dropped():
    """Regression for the original's bug (building_blocks.py:69): it redrew the mask whenever every
    channel was kept, so a small p looped until something was dropped; signal_to_noise=None crashed."""
    x = torch.rand(2, 8, 4, 4)
    dropout = GaussianDropout2d(p=1e-9, signal_to_noise=None).train()
    assert torch.equal(dropout(x), x)
    assert torch.equal(dropout.eval()(x), x)


def test_gaussian_dropout_never_drops_every_channel():
    torch.manual_seed(0)
    x = torch.rand(1, 2, 4, 4) + 5
    dropout = GaussianDropout2d(p=0.99, signal_to_noise=None).train()
    for _ in range(20):
        kept = [torch.equal(a, b) for a, b in zip(dropout(x)[0], x[0])]
        assert any(kept)
