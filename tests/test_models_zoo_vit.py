"""The PhilEO Bench zoo's ViT models: prithvi-100m, satmae, vit-cnn, vit-cnn-gc and their classifiers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn

from phileo.bands import MODEL_BANDS
from phileo.models import build, build_task_model, list_models
from phileo.models.inputs import prepare_input, prepare_target
from phileo.models.zoo_vit import PRITHVI_BANDS
from phileo.models.zoo_vit_encoders import sincos_pos_embed_3d

DATA = Path(__file__).parent / "data"
FAMILIES = ["prithvi-100m", "satmae", "vit-cnn", "vit-cnn-gc"]
FULL = [name + suffix for name in FAMILIES for suffix in ("", "-classifier")]
TINY = [name + "-tiny" + suffix for name in FAMILIES for suffix in ("", "-classifier")]

# Parameter counts (all, trainable) of the ORIGINAL models (91097luke/phileo-bench, output_dim=1, "core_nano" decoder,
# built as training_script.py get_models_pretrained builds them), measured with
#   python tools/original_zoo_vit.py --orig-bench /path/to/phileo-bench --listings tests/data --compare
# which also wrote tests/data/<name>_state_dict.txt (key TAB shape, state-dict order) and found our -tiny models'
# outputs bit-equal to the originals' at the same configuration and weights (max |difference| 0).
ORIGINAL_COUNTS = {
    "prithvi-100m": (97_476_401, 97_325_105),
    "prithvi-100m-classifier": (86_684_929, 86_533_633),
    "satmae": (412_726_833, 412_614_705),
    "satmae-classifier": (303_609_345, 303_497_217),
    "vit-cnn": (336_213_041, 335_163_441),
    "vit-cnn-classifier": (304_053_249, 303_003_649),
    "vit-cnn-gc": (206_339_889, 205_814_321),
    "vit-cnn-gc-classifier": (86_003_969, 85_478_401),
}
# The fixed sin-cos tables: never trained (requires_grad False in frozen and full mode, as the originals).
FIXED = {"prithvi": {"vit_encoder.pos_embed"}, "satmae": {"vit_encoder.pos_embed", "vit_encoder.channel_embed"},
         "vit-cnn-gc": {"vit_encoder.pos_embed", "vit_encoder.channel_embed"}, "vit-cnn": {"vit_encoder.pos_embed"}}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _task(name: str) -> dict:
    """build_task_model's task for a model: a classifier (B, K) takes the classification task."""
    per_patch = name.endswith("-classifier") or name.startswith("core-encoder-nano")
    return {"task": "classification", "num_classes": 11} if per_patch else {"task": "segmentation"}


def _fixed(name: str) -> set[str]:
    return next(keys for prefix, keys in sorted(FIXED.items(), key=lambda kv: -len(kv[0])) if name.startswith(prefix))


def _listing(model: nn.Module) -> list[str]:
    return [f"{key}\t{','.join(map(str, t.shape))}" for key, t in model.state_dict().items()]


def _input(model: nn.Module, batch: int = 2) -> torch.Tensor:
    shape = (batch, model.in_chans, model.img_size, model.img_size)
    return torch.randn(shape, generator=torch.Generator().manual_seed(0))


def test_registry_lists_every_model_its_classifier_and_tiny_variants():
    assert set(FULL) | set(TINY) <= set(list_models())


@pytest.mark.parametrize("name", FULL)
def test_parameter_counts_and_state_dict_listing_equal_the_original(name):
    with torch.device("meta"):  # no allocation for ~400M parameters
        model = build(name)
    counts = (sum(p.numel() for p in model.parameters()),
              sum(p.numel() for p in model.parameters() if p.requires_grad))
    assert counts == ORIGINAL_COUNTS[name]
    assert _listing(model) == (DATA / f"{name.replace('-', '_')}_state_dict.txt").read_text().splitlines()
    assert {k for k, p in model.named_parameters() if not p.requires_grad} == _fixed(name)


@pytest.mark.parametrize("name", TINY)
def test_tiny_forward_backward_reaches_every_trainable_parameter(name):
    torch.manual_seed(0)
    model = build(name, output_dim=3)
    out = model(_input(model))
    expected = (2, 3) if name.endswith("-classifier") else (2, 3, model.img_size, model.img_size)
    assert out.shape == expected and out.dtype == torch.float32
    out.square().mean().backward()
    no_grad = [k for k, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert no_grad == []  # DDP needs no find_unused_parameters


@pytest.mark.parametrize("name", TINY)
def test_encode_is_the_normed_cls_token(name):
    model = build(name).eval()
    x = _input(model)
    with torch.no_grad():
        embedding, tokens = model.encode(x), model.forward_features(x)
    assert embedding.shape == (2, model.vit_encoder.embed_dim)
    torch.testing.assert_close(embedding, tokens[:, 0], rtol=0, atol=0)
    with pytest.raises(ValueError, match="expected input"):
        model.encode(x[:, :, :-8, :-8])


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("frozen", [True, False])
def test_frozen_mode_freezes_exactly_the_pretrained_encoder(name, frozen):
    model = build_task_model(name, **_task(name), freeze_encoder=frozen)
    encoder = {k for k, _ in model.named_parameters() if k.startswith(model.encoder_prefixes)}
    assert {id(p) for p in model.encoder_parameters()} == {id(p) for k, p in model.named_parameters() if k in encoder}
    fixed = _fixed(name)
    # the encoder = everything under vit_encoder. but the fixed tables (Prithvi: pos_embed is not even loaded)
    assert encoder | fixed == {k for k, _ in model.named_parameters() if k.startswith("vit_encoder.")}
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    everything = {k for k, _ in model.named_parameters()}
    assert trainable == (everything - encoder - fixed if frozen else everything - fixed)


def _published(model: nn.Module, family: str) -> dict:
    """A checkpoint in the published format: the bare encoder's keys, plus the MAE decoder keys the originals
    skip, random values. Prithvi_100M.pt's pos_embed is for 3 frames; SatMAE's file nests its weights in "model"."""
    g = torch.Generator().manual_seed(1)
    state = {k.removeprefix("vit_encoder."): torch.randn(v.shape, generator=g)
             for k, v in model.state_dict().items() if k.startswith("vit_encoder.")}
    dim = model.vit_encoder.embed_dim
    state |= {"mask_token": torch.randn(1, 1, dim), "decoder_embed.weight": torch.randn(dim, dim),
              "decoder_blocks.0.norm1.weight": torch.randn(dim), "decoder_pred.bias": torch.randn(7)}
    if family == "prithvi":
        tokens = state["pos_embed"].shape[1] - 1
        state["pos_embed"] = torch.randn(1, 3 * tokens + 1, dim)
        state["decoder_pos_embed"] = torch.randn(1, 3 * tokens + 1, dim)
    return {"model": state, "epoch": 199} if family == "satmae" else state


@pytest.mark.parametrize("name", TINY)
def test_published_checkpoint_file_loads_strictly_onto_the_encoder(name, tmp_path):
    family = name.removesuffix("-classifier").removesuffix("-tiny").removesuffix("-100m")
    reference = build(name)
    torch.save(_published(reference, family), tmp_path / "published.pt")
    checkpoint = torch.load(tmp_path / "published.pt", weights_only=True)
    weights = checkpoint.get("model", checkpoint)
    model = build_task_model(name, **_task(name), init_state_dict=checkpoint, freeze_encoder=True)
    own = model.state_dict()
    loaded = [k for k in own if k.startswith(model.encoder_prefixes)]
    assert loaded and all(torch.equal(own[k], weights[k.removeprefix("vit_encoder.")]) for k in loaded)
    if family == "prithvi":  # never loaded (as the bench): the 1-frame table of the init
        assert torch.equal(own["vit_encoder.pos_embed"][0], sincos_pos_embed_3d(32, (1, 14, 14)))
    else:  # the published 2-D table (and SatMAE's group table) load with the encoder, as the originals'
        assert all(torch.equal(own[k], weights[k.removeprefix("vit_encoder.")]) for k in _fixed(name))
    # our own checkpoints (vit_encoder.* keys, as `phileo-train` writes them) load the same way
    again = build_task_model(name, **_task(name), init_state_dict={"model": own})
    assert all(torch.equal(again.state_dict()[k], own[k]) for k in loaded)


def test_wrong_checkpoints_are_refused_with_a_clear_error():
    unet = build("geoaware-unet-tiny").state_dict()  # another family: none of the encoder's keys
    with pytest.raises(ValueError, match=r"lacks \d+ encoder keys of 'satmae-tiny'"):
        build_task_model("satmae-tiny", init_state_dict=unet)
    plain = {k.removeprefix("vit_encoder."): v for k, v in build("vit-cnn-tiny").state_dict().items()}
    without_a_block = {k: v for k, v in plain.items() if not k.startswith("blocks.1.")}
    with pytest.raises(ValueError, match=r"lacks 12 encoder keys of 'vit-cnn-tiny'.*blocks\.1\."):
        build_task_model("vit-cnn-tiny", init_state_dict=without_a_block)
    with pytest.raises(RuntimeError, match="size mismatch for vit_encoder.pos_embed"):
        build_task_model("satmae-tiny", init_state_dict=plain)  # same names, other geometry
    with pytest.raises(ValueError, match=r"unknown override\(s\) \['bands'\]"):
        build("satmae-tiny", bands="bench")


def test_input_conventions():
    specs = {name: build(name).input_spec for name in ("prithvi-100m-tiny", "satmae-tiny", "vit-cnn-gc-tiny")}
    assert specs["prithvi-100m-tiny"].bands == ("B02", "B03", "B04", "B8A", "B11", "B12")
    assert (specs["prithvi-100m-tiny"].img_size, specs["prithvi-100m-tiny"].normalize) == (224, "prithvi")
    assert (specs["satmae-tiny"].img_size, specs["satmae-tiny"].crop_from, specs["satmae-tiny"].normalize) == (
        96, 128, "satmae")
    assert specs["vit-cnn-gc-tiny"].bands == MODEL_BANDS and specs["vit-cnn-gc-tiny"].normalize == "reflectance"
    # bands="bench": the original loader's index picks (0, 1, 2, 4, 5, 6) of the bench's band order
    bench = build("prithvi-100m-tiny-classifier", bands="bench")
    assert bench.input_spec.bands == PRITHVI_BANDS["bench"]
    dn = torch.randint(0, 10000, (1, 10, 224, 224), dtype=torch.int32)
    torch.testing.assert_close(prepare_input(dn, bench.input_spec), _prithvi_norm(dn[:, [0, 1, 2, 4, 5, 6]]),
                               rtol=0, atol=0)
    names = build("prithvi-100m-tiny", bands="B04, B03, B02, B08, B11, B12").input_spec.bands
    assert names == ("B04", "B03", "B02", "B08", "B11", "B12")
    for wrong in ("rgb", "B02,B03,B04", ("B02", "B03", "B04", "B8A", "B11", "B10")):
        with pytest.raises(ValueError, match="expected one of hls, bench or six band names"):
            build("prithvi-100m-tiny", bands=wrong)
    # SatMAE: the 128 px patch and its label are cut to the centre 96 px
    satmae = build("satmae-tiny")
    x = prepare_input(torch.randint(0, 10000, (2, 10, 128, 128)), satmae.input_spec)
    label = prepare_target(torch.arange(128 * 128).view(1, 128, 128), satmae.input_spec)
    assert x.shape == (2, 10, 96, 96) and satmae(x).shape == (2, 1, 96, 96)
    assert label.shape == (1, 96, 96) and label[0, 0, 0] == 16 * 128 + 16


def _prithvi_norm(six_bands: torch.Tensor) -> torch.Tensor:
    from phileo.models.inputs import PRITHVI_MEAN, PRITHVI_STD

    mean, std = torch.tensor(PRITHVI_MEAN).view(1, -1, 1, 1), torch.tensor(PRITHVI_STD).view(1, -1, 1, 1)
    return (six_bands.float() - mean) / std


def test_prithvi_pos_embed_is_the_fixed_single_frame_3d_table():
    model = build("prithvi-100m-tiny")
    table = sincos_pos_embed_3d(32, (1, 14, 14))
    assert torch.equal(model.vit_encoder.pos_embed[0], table) and not model.vit_encoder.pos_embed.requires_grad
    assert table.shape == (197, 32) and not table[0].any()  # CLS row
    # channels: 12 column, 12 row, 8 frame; one frame -> sin(0) = 0, cos(0) = 1 on every token
    assert torch.equal(table[1:, 24:28], torch.zeros(196, 4)) and torch.equal(table[1:, 28:], torch.ones(196, 4))
    assert torch.equal(table[1:15, 12:24], table[1:2, 12:24].expand(14, -1))  # one row: same row code
    assert torch.equal(table[1::14, :12], table[1:2, :12].expand(14, -1))  # one column: same column code


def test_grouped_token_map_is_group_after_group_on_the_channel_axis():
    encoder = build("vit-cnn-gc-tiny").vit_encoder
    groups, grid, dim = len(encoder.channel_groups), encoder.grid_size, encoder.embed_dim
    token_group = torch.arange(groups).repeat_interleave(grid * grid).view(1, -1, 1).float()
    tokens = torch.cat([torch.full((1, 1, dim), -1.0), token_group.expand(-1, -1, dim)], dim=1)
    feature_map = encoder.tokens_to_map(tokens)
    assert feature_map.shape == (1, groups * dim, grid, grid)
    assert torch.equal(feature_map[0, :, 0, 0], torch.arange(groups).repeat_interleave(dim).float())
