"""PhilEO ViT, ViT UPerNet (100M / 300M / pretraining variant), the native UPerHead and the task-head API."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from phileo.models import build, list_models
from phileo.models.task_heads import build_task_model, load_encoder
from phileo.models.upernet import default_taps
from phileo.models.vit import sincos_pos_embed_2d
from training.objective import foundation_loss, make_views

DATA = Path(__file__).parent / "data"
# Key<TAB>shape of every state-dict entry, in order, of the ORIGINAL PhilEO_ViT(input_dim=10, chw=(10,128,128),
# patch_size=4, embed_dim=512, depth=32, num_heads=16, latent_dim=1024, LeakyReLU) and PhiViTUperNet(output_dim=1).
LISTINGS = {
    "phileo-vit": DATA / "phileo_vit_state_dict.txt",
    "vit-upernet-100m": DATA / "vit_upernet_100m_state_dict.txt",
}
INPUT_SHAPE = (10, 128, 128)
POS_EMBED_VALUES = 1025 * 512  # the frozen pos_embed of the 512-wide ViTs (counted by the original, not trained)

# Parameter counts measured by building the original classes (PhilEO-MajorTOM model/, phileo-bench/models/),
# out_chans 1 for downstream models.
ORIGINAL_COUNTS = {
    "phileo-vit": 141_178_690,
    "vit-upernet-100m": 112_297_767,
    "vit-upernet-300m": 318_609_921,
    "vit-upernet-100m-pretrain": 112_955_330,
}
PRETRAIN_TINY = ["phileo-vit-tiny", "vit-upernet-tiny-pretrain"]


def _meta(name: str, **overrides) -> nn.Module:
    with torch.device("meta"):  # counts and key listings without allocating or initialising ~1 GB
        return build(name, **overrides)


def _count(model: nn.Module, trainable: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable)


def _listing(model: nn.Module) -> list[str]:
    return [f"{name}\t{','.join(map(str, t.shape))}" for name, t in model.state_dict().items()]


def _labels(batch: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "coords": torch.rand(batch, 4, generator=g), "coords_weight": torch.ones(batch),
        "clouds": torch.softmax(torch.randn(batch, 4, generator=g), 1), "clouds_weight": torch.ones(batch),
        "buildings": torch.rand(batch, 1, generator=g), "buildings_weight": torch.ones(batch),
        "landcover": torch.softmax(torch.randn(batch, 11, generator=g), 1), "landcover_weight": torch.ones(batch),
    }


def _without_grad(model: nn.Module) -> list[str]:
    """Trainable parameters that got no (or an all-zero) gradient: DDP would need find_unused_parameters."""
    return [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]


@pytest.fixture(scope="module")
def tiny() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {name: build(name).eval() for name in ["phileo-vit-tiny", "vit-upernet-tiny", "vit-upernet-tiny-pretrain"]}


# ------------------------------------------------------------------------------------------- registry


def test_registry_lists_the_new_models():
    assert set(ORIGINAL_COUNTS) | {"phileo-vit-tiny", "vit-upernet-tiny", "vit-upernet-tiny-pretrain"} <= set(
        list_models()
    )


@pytest.mark.parametrize("name", sorted(ORIGINAL_COUNTS))
def test_parameter_counts_equal_the_original(name):
    assert _count(_meta(name)) == ORIGINAL_COUNTS[name]


def test_counts_of_other_outputs_and_the_frozen_pos_embed():
    assert _count(_meta("vit-upernet-100m", out_chans=11)) == 112_300_337  # the bench's 11-class land cover
    # pos_embed is a parameter (as the original's, so the counts above match) that is never trained.
    assert _count(_meta("phileo-vit"), trainable=True) == 141_178_690 - POS_EMBED_VALUES
    assert not _meta("phileo-vit").encoder.vit_encoder.pos_embed.requires_grad


@pytest.mark.parametrize("name", sorted(LISTINGS))
def test_state_dict_names_shapes_and_order_equal_the_original(name):
    assert _listing(_meta(name)) == LISTINGS[name].read_text().splitlines()


def test_300m_structure():
    model = _meta("vit-upernet-300m")
    assert model.taps == [5, 11, 17, 23] and not any(k.startswith("stem.") for k in model.state_dict())
    assert model.vit.blocks[0].norm1.eps == 1e-6 and len(model.vit.blocks) == 24
    assert default_taps(32) == [7, 15, 23, 31] and default_taps(24) == [5, 11, 17, 23]


# --------------------------------------------------------------------------------------------- forward


@pytest.mark.parametrize("name", PRETRAIN_TINY)
@pytest.mark.parametrize("batch_size", [1, 3])
def test_pretraining_forward_is_the_unet_5_tuple(name, batch_size, tiny):
    model = tiny[name]
    with torch.no_grad():
        out = model(torch.rand(batch_size, *INPUT_SHAPE))
    reconstruction, embeddings, vit_output, decoded, (coords, clouds, buildings, landcover) = out
    assert reconstruction.shape == (batch_size, *INPUT_SHAPE) and decoded.shape == (batch_size, *INPUT_SHAPE)
    assert embeddings.shape == (batch_size, model.num_features)
    assert vit_output.shape == (batch_size, 1 + 32 * 32, 64)
    assert coords.shape == (batch_size, 4) and clouds.shape == (batch_size, 4)
    assert buildings.shape == (batch_size, 1) and landcover.shape == (batch_size, 11)
    for sigmoid_output in (reconstruction, coords, buildings):
        assert sigmoid_output.min() > 0 and sigmoid_output.max() < 1


@pytest.mark.parametrize("batch_size", [1, 3])
def test_downstream_forward_shape(batch_size, tiny):
    with torch.no_grad():
        assert tiny["vit-upernet-tiny"](torch.rand(batch_size, *INPUT_SHAPE)).shape == (batch_size, 1, 128, 128)


def test_forward_features_is_the_encoder_part_of_forward(tiny):
    x = torch.rand(1, *INPUT_SHAPE)
    model = tiny["phileo-vit-tiny"]
    with torch.no_grad():
        features, out = model.forward_features(x), model(x)
        hidden = tiny["vit-upernet-tiny"].forward_features(x)
    assert torch.equal(features.embeddings, out.embeddings) and torch.equal(features.vit_output, out.vit_output)
    assert len(features.hidden_states) == 4 and features.hidden_states[-1] is features.vit_output
    assert len(hidden) == 4 and hidden[-1].shape == (1, 1025, 64)


def test_wrong_input_size_and_bad_taps_are_clear_errors(tiny):
    with pytest.raises(ValueError, match=r"expected input \(B, 10, 128, 128\)"):
        tiny["phileo-vit-tiny"](torch.rand(1, 10, 64, 64))
    with pytest.raises(ValueError, match="taps must be 4 block indices"):
        build("vit-upernet-tiny", taps=[0, 1, 2, 4])


def test_pos_embed_is_the_mae_sincos_embedding():
    """Against MAE's numpy get_2d_sincos_pos_embed (w coordinate first), which the original uses."""

    def one_d(dim, pos):
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=float) / (dim / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    dim, g = 64, 8
    grid = np.stack(np.meshgrid(np.arange(g, dtype=np.float32), np.arange(g, dtype=np.float32)), axis=0)
    ref = np.concatenate([one_d(dim // 2, grid[0]), one_d(dim // 2, grid[1])], axis=1)
    ref = np.concatenate([np.zeros([1, dim]), ref], axis=0)
    torch.testing.assert_close(sincos_pos_embed_2d(dim, g), torch.from_numpy(ref).float(), rtol=0, atol=1e-7)
    pos = build("phileo-vit-tiny").encoder.vit_encoder.pos_embed
    torch.testing.assert_close(pos[0], sincos_pos_embed_2d(64, 32), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------- pretraining


@pytest.mark.parametrize("name", PRETRAIN_TINY)
def test_pretraining_step_with_foundation_loss_reaches_every_trainable_parameter(name):
    """DDP without find_unused_parameters needs every trainable parameter in the graph (pos_embed is frozen)."""
    torch.manual_seed(0)
    model = build(name).train()
    batch = 2  # the smallest batch with a negative pair in the similarity term (and BN statistics)
    view_a, view_b, target_a, target_b = make_views(torch.rand(batch, *INPUT_SHAPE), torch.Generator().manual_seed(1))
    out_a, out_b = model(view_a), model(view_b)
    loss, logs = foundation_loss(out_a, out_b, target_a, target_b, _labels(batch))
    loss.backward()
    assert torch.isfinite(loss) and logs["recon"] > 0
    assert _without_grad(model) == []
    assert [n for n, p in model.named_parameters() if not p.requires_grad] == ["encoder.vit_encoder.pos_embed"]


# ----------------------------------------------------------------------------- checkpoints -> downstream


def _decoder_or_head(key: str) -> bool:
    return key.startswith(("fpn", "sample_list_base.", "decoder_upernet."))


@pytest.mark.filterwarnings("ignore:for .*copying from a non-meta parameter")  # BN counters of the meta model
@pytest.mark.parametrize("pair", [("phileo-vit-tiny", "vit-upernet-tiny"), ("phileo-vit", "vit-upernet-100m")])
def test_phileo_vit_checkpoint_loads_into_vit_upernet_stem_and_encoder(pair):
    source, target = pair
    meta = source == "phileo-vit"  # the full-size pair: names and shapes only
    if meta:
        state, model = _meta(source).state_dict(), _meta(target)
    else:
        torch.manual_seed(0)
        state = {"module." + k: v for k, v in build(source).state_dict().items()}  # a DDP checkpoint
        model = build(target)
    missing, unexpected = load_encoder(model, state)
    assert missing and all(_decoder_or_head(k) for k in missing)
    assert sorted({k.removeprefix("module.").split(".")[0] for k in unexpected}) == ["decoder", "head"]
    if not meta:
        loaded = model.state_dict()
        assert torch.equal(loaded["stem.conv1.weight"], state["module.stem.conv1.weight"])
        block = "vit_encoder.blocks.3.mlp.fc2.weight"
        assert torch.equal(loaded["vit_encoder." + block], state["module.encoder." + block])


# ------------------------------------------------------------------------------------------ task heads


@pytest.mark.parametrize("name", ["geoaware-unet-tiny", "phileo-vit-tiny", "vit-upernet-tiny"])
@pytest.mark.parametrize("task, channels", [("regression", 1), ("segmentation", 11)])
def test_task_model_output_shapes(name, task, channels):
    torch.manual_seed(0)
    model = build_task_model(name, task).eval()
    batch_size = 3 if task == "regression" else 1
    with torch.no_grad():
        assert model(torch.rand(batch_size, *INPUT_SHAPE)).shape == (batch_size, channels, 128, 128)


@pytest.mark.parametrize("name", ["geoaware-unet-tiny", "phileo-vit-tiny", "vit-upernet-tiny"])
def test_freeze_encoder_freezes_exactly_the_encoder(name):
    def trainable(model):
        return {n for n, p in model.named_parameters() if p.requires_grad}

    model = build_task_model(name, "segmentation")
    encoder = {id(p) for p in model.encoder_parameters()}
    encoder_names = {n for n, p in model.named_parameters() if id(p) in encoder}
    assert {n.split(".")[0] for n in encoder_names} == {"stem", "encoder" if "unet" in name else "vit_encoder"}
    frozen = build_task_model(name, "segmentation", freeze_encoder=True)
    assert trainable(frozen) == trainable(model) - encoder_names
    assert trainable(frozen) and all(not n.startswith(("stem.", "encoder.", "vit_encoder.")) for n in trainable(frozen))


@pytest.mark.parametrize("name", ["geoaware-unet-tiny", "phileo-vit-tiny"])
def test_task_model_trains_every_trainable_parameter(name):
    """Unused pretraining heads are frozen, so a fine-tuning step under DDP needs no find_unused_parameters."""
    torch.manual_seed(0)
    model = build_task_model(name, "segmentation").train()
    batch = 1 if "unet" in name else 2  # UPerHead: BN after the 1x1 pyramid pooling needs 2 samples in training
    logits = model(torch.rand(batch, *INPUT_SHAPE))
    nn.functional.cross_entropy(logits, torch.randint(0, 11, (batch, 128, 128))).backward()
    assert _without_grad(model) == []


def test_task_model_from_a_pretraining_checkpoint():
    torch.manual_seed(0)
    unet = build("geoaware-unet-tiny")
    model = build_task_model("geoaware-unet-tiny", "regression", init_state_dict={"model": unet.state_dict()})
    for key in ("stem.conv1.weight", "encoder.linear_encode.1.weight", "decoder.linear_decode.weight"):
        assert torch.equal(model.state_dict()[key], unet.state_dict()[key])
    assert model.head.conv3.weight.shape[0] == 1  # a new head, not the reconstruction head
    missing, unexpected = load_encoder(model, unet.state_dict())
    assert {k.split(".")[0] for k in missing} == {"head"} and {k.split(".")[0] for k in unexpected} == {"head"}
    vit = build("phileo-vit-tiny")
    model = build_task_model("phileo-vit-tiny", "segmentation", init_state_dict=vit.state_dict(), freeze_encoder=True)
    key = "vit_encoder.vit_encoder.blocks.0.attn.qkv.weight"
    assert torch.equal(model.state_dict()[key], vit.state_dict()[key.removeprefix("vit_")])


def test_unknown_task_and_a_checkpoint_without_the_encoder_are_clear_errors():
    with pytest.raises(ValueError, match="unknown task 'depth'"):
        build_task_model("vit-upernet-tiny", "depth")
    decoder_only = {k: v for k, v in build("phileo-vit-tiny").state_dict().items() if k.startswith("decoder.")}
    with pytest.raises(ValueError, match="lacks .* encoder keys of 'phileo-vit-tiny'"):
        build_task_model("phileo-vit-tiny", init_state_dict=decoder_only)
