"""The CNN half of the PhilEO Bench model zoo: same keys, shapes and parameter counts as the bench's own models,
frozen mode = the pretrained encoder, `--init` files (GeoAware, torchvision/timm, SeCo lightning) load strictly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn
from torchvision.models.resnet import BasicBlock, ResNet

from phileo.bands import MODEL_BANDS
from phileo.models import build, build_task_model
from phileo.models.core_cnn import CoreCNNBlock, get_activation
from phileo.models.inputs import prepare_input

DATA = Path(__file__).parent / "data"
# Parameters of the ORIGINAL models built with input_dim=10, output_dim=1 as training_script.py builds them,
# measured with `python tools/original_zoo_cnn.py --orig-bench /path/to/phileo-bench` (91097luke/phileo-bench);
# the same command with `--listings tests/data` wrote the <name>_state_dict.txt files.
ORIGINAL_PARAMS: dict[str, int] = {
    "baseline-cnn": 3_016_449,
    "core-unet-nano": 65_447_765,
    "core-encoder-nano": 17_379_041,
    "geoaware-core-nano": 65_447_765,
    "geoaware-core-nano-classifier": 17_379_041,
    "resnet50": 121_242_737,
    "resnet50-classifier": 23_510_081,
    "seco-resnet50": 121_242_737,
    "seco-resnet50-classifier": 27_706_433,
}
CLASSIFIERS = {"core-encoder-nano", "geoaware-core-nano-classifier", "resnet50-classifier",
               "seco-resnet50-classifier"}
TINY: dict[str, str] = {  # full name -> tiny variant
    name: (name.removesuffix("-classifier") + "-tiny" + ("-classifier" if name.endswith("-classifier") else ""))
    for name in ORIGINAL_PARAMS
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _listing(name: str) -> list[str]:
    return (DATA / f"{name.replace('-', '_')}_state_dict.txt").read_text().splitlines()


def _meta(name: str, **overrides) -> nn.Module:
    with torch.device("meta"):  # names, shapes and counts without allocating 121M parameters
        return build(name, **overrides)


def _tiny_input(model: nn.Module, batch: int = 2) -> torch.Tensor:
    return torch.rand(batch, model.in_chans, 32, 32)  # ResNets downsample 32x, the core CNNs 16x


@pytest.mark.parametrize("name", sorted(ORIGINAL_PARAMS))
def test_parameter_count_equals_the_original(name):
    assert sum(p.numel() for p in _meta(name).parameters()) == ORIGINAL_PARAMS[name]


@pytest.mark.parametrize("name", sorted(ORIGINAL_PARAMS))
def test_state_dict_names_shapes_and_order_equal_the_original(name):
    ours = [f"{k}\t{','.join(map(str, v.shape))}" for k, v in _meta(name).state_dict().items()]
    assert ours == _listing(name)


@pytest.mark.parametrize("name", sorted(ORIGINAL_PARAMS))
def test_tiny_forward_encode_and_backward(name):
    torch.manual_seed(0)
    model = build(TINY[name], output_dim=3)
    x = _tiny_input(model)
    out = model(x)
    expected = (2, 3) if name in CLASSIFIERS else (2, 3, *x.shape[-2:])
    assert tuple(out.shape) == expected
    out.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())
    embedding = model.encode(x)
    features = model.forward_features(x)
    assert embedding.shape == features.shape[:2] and embedding.ndim == 2
    torch.testing.assert_close(embedding, features.mean(dim=(-2, -1)))


def _task(name: str) -> dict:
    """build_task_model's task for a model: a classifier (B, K) takes the classification task."""
    per_patch = name.endswith("-classifier") or name.startswith("core-encoder-nano")
    return {"task": "classification", "num_classes": 11} if per_patch else {"task": "segmentation"}


@pytest.mark.parametrize("name", sorted(ORIGINAL_PARAMS))
def test_frozen_mode_freezes_exactly_the_encoder(name):
    model = build_task_model(TINY[name], **_task(TINY[name]), freeze_encoder=True)
    encoder = {n for n, _ in model.named_parameters() if n.startswith(model.encoder_prefixes)}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert encoder and trainable
    assert trainable == {n for n, _ in model.named_parameters()} - encoder
    assert {id(p) for p in model.encoder_parameters()} == {id(p) for n, p in model.named_parameters() if n in encoder}


@pytest.mark.parametrize("name", sorted(ORIGINAL_PARAMS))
def test_every_model_declares_its_input(name):
    model = _meta(name)
    spec = model.input_spec
    assert model.is_downstream and model.in_chans == spec.in_chans and model.img_size == spec.img_size
    if "resnet50" in name:  # the bench feeds 224 px and keeps x[:, (2, 1, 0)] of B02,B03,B04,... = RGB
        assert (spec.bands, spec.img_size, spec.normalize) == (("B04", "B03", "B02"), 224, "reflectance")
    else:
        assert (spec.bands, spec.img_size, spec.normalize) == (MODEL_BANDS, 128, "reflectance")


def test_resnet_input_equals_the_bench_selection_of_reflectance():
    spec = _meta("seco-resnet50").input_spec
    dn = torch.randint(0, 10000, (2, 10, 224, 224), dtype=torch.int32)
    expected = (dn.float() / 10000.0)[:, (2, 1, 0)]  # load_data.callback_preprocess, then Seco.forward
    assert torch.equal(prepare_input(dn, spec), expected)


def test_wrong_band_count_is_a_clear_error():
    model = build("resnet50-tiny")
    with pytest.raises(ValueError, match=r"expected input \(B, 3, H, W\) \(bands B04,B03,B02\)"):
        model(torch.rand(1, 10, 32, 32))
    with pytest.raises(ValueError, match="multiples of 16"):
        build("core-unet-nano-tiny")(torch.rand(1, 10, 40, 40))


def test_core_cnn_block_keeps_the_bench_quirks():
    assert type(get_activation("relu")) is nn.ReLU6
    torch.manual_seed(0)
    block = CoreCNNBlock(16, 32).eval()
    x = torch.randn(2, 16, 8, 8) * 4
    with torch.no_grad():
        y = block.norm3(block.conv3(block.activation(block.norm2(block.conv2(block.activation(
            block.norm1(block.conv1(x))))))))
        gate = block.squeeze.excitation(y.mean(dim=(-2, -1)))[..., None, None]
        expected = torch.clamp(y * y * gate + block.match_channels(x), 0.0, 6.0)  # x^2 * gate, ReLU6
        torch.testing.assert_close(block(x), expected)


def _core_encoder_checkpoint() -> dict[str, torch.Tensor]:
    """A CoreEncoder-format GeoAware checkpoint (stem.*, encoder_blocks.*, a pretraining head of other width)."""
    torch.manual_seed(1)
    encoder = build("core-encoder-nano-tiny", output_dim=7)
    return {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in encoder.state_dict().items()}


def _positional_load(checkpoint: dict, model_keys: list[str]) -> dict[str, torch.Tensor]:
    """What the bench's CoreEncoderGeoPretrained.load_encoder_weights loads: keys paired by position, head skipped
    (models/model_GeoAwarePretrained.py:66)."""
    return {name: checkpoint[k] for k, name in zip(checkpoint, model_keys) if not k.startswith("head")}


def test_geoaware_loads_what_the_bench_positional_pairing_loads(tmp_path):
    checkpoint = _core_encoder_checkpoint()
    torch.save(checkpoint, tmp_path / "CoreEncoder_last_8.pt")
    loaded = torch.load(tmp_path / "CoreEncoder_last_8.pt", weights_only=True)
    model = build_task_model("geoaware-core-nano-tiny", init_state_dict=loaded, freeze_encoder=True)
    inner_keys = list(build("core-unet-nano-tiny").state_dict())
    expected = _positional_load(checkpoint, inner_keys)
    assert set(expected) == {k.removeprefix("coreunet.") for k in model.state_dict()
                             if k.startswith(model.encoder_prefixes)}
    state = model.state_dict()
    for key, value in expected.items():
        assert torch.equal(state[f"coreunet.{key}"], value), key
    # The classifier loads the same file by name into `model.` (model_GeoAwarePretrained_classifier.py:19-26).
    classifier = build_task_model("geoaware-core-nano-tiny-classifier", **_task("-classifier"), init_state_dict=loaded)
    assert torch.equal(classifier.model.stem.conv1.weight, checkpoint["stem.conv1.weight"])


def test_geoaware_unet_file_fills_the_decoder_too():
    torch.manual_seed(2)
    unet = build("core-unet-nano-tiny", output_dim=5)  # a CoreUnet-format file: stem.0.*, decoder_blocks.*, ...
    model = build_task_model("geoaware-core-nano-tiny", init_state_dict={"model": unet.state_dict()})
    assert torch.equal(model.coreunet.bridge[0].conv3.weight, unet.bridge[0].conv3.weight)
    assert torch.equal(model.coreunet.stem[0].conv1.weight, unet.stem[0].conv1.weight)


def _encoder_keys(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if k.startswith(model.encoder_prefixes)}


def _mapped_keys(model: nn.Module, keys: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Checkpoint key -> model key through pretrained_key_map (only keys that map)."""
    out = {}
    for key, shape in keys.items():
        for source, target in model.pretrained_key_map.items():
            if key.startswith(source):
                out[target + key[len(source):]] = shape
                break
    return out


@pytest.mark.parametrize("name", ["resnet50", "resnet50-classifier"])
def test_torchvision_and_timm_resnet50_names_cover_the_encoder(name):
    import timm
    from torchvision.models import resnet50

    model = _meta(name)
    with torch.device("meta"):
        for published in (resnet50(), timm.create_model("resnet50", pretrained=False)):
            keys = {k: tuple(v.shape) for k, v in published.state_dict().items()}
            assert _mapped_keys(model, keys) == _encoder_keys(model)


@pytest.mark.parametrize("name", ["seco-resnet50", "seco-resnet50-classifier"])
def test_seco_lightning_encoder_q_names_cover_the_encoder(name):
    # Key listing of the bench's MocoV2 (models/seco_utils/moco2_module.py) with a ResNet-50 base encoder.
    keys = {k: tuple(int(d) for d in s.split(",") if d) for k, s in (line.split("\t") for line in
                                                                     _listing("seco-moco-checkpoint"))}
    model = _meta(name)
    assert _mapped_keys(model, keys) == _encoder_keys(model)


def test_resnet_loads_a_torchvision_file_strictly(tmp_path):
    torch.manual_seed(3)
    published = ResNet(BasicBlock, [1, 1, 1, 1])  # the tiny body, with torchvision's names and its fc
    torch.save(published.state_dict(), tmp_path / "resnet.pth")
    state = torch.load(tmp_path / "resnet.pth", weights_only=True)
    for name in ("resnet50-tiny", "resnet50-tiny-classifier"):
        model = build_task_model(name, **_task(name), init_state_dict=state)
        assert torch.equal(model.encoder[7][0].conv2.weight, published.layer4[0].conv2.weight)
        assert torch.equal(model.encoder[1].running_var, published.bn1.running_var)


def test_seco_loads_a_lightning_checkpoint_strictly(tmp_path):
    torch.manual_seed(4)
    body = build("seco-resnet50-tiny").encoder
    query = {f"encoder_q.{k}": torch.randn_like(v) if v.is_floating_point() else v
             for k, v in body.state_dict().items()}
    momentum = {f"encoder_k.{k}": torch.zeros_like(v) for k, v in body.state_dict().items()}
    ckpt = {"epoch": 3, "state_dict": {**query, **momentum, "queue": torch.randn(1, 128, 16)}}
    torch.save(ckpt, tmp_path / "seco_resnet50_1m.ckpt")
    loaded = torch.load(tmp_path / "seco_resnet50_1m.ckpt", weights_only=True)
    for name in ("seco-resnet50-tiny", "seco-resnet50-tiny-classifier"):
        model = build_task_model(name, **_task(name), init_state_dict=loaded)
        for key, value in model.encoder.state_dict().items():
            assert torch.equal(value, query[f"encoder_q.{key}"]), key


@pytest.mark.parametrize("name", ["geoaware-core-nano-tiny", "seco-resnet50-tiny", "resnet50-tiny-classifier"])
def test_checkpoint_missing_encoder_keys_is_refused(name):
    model = build(name)
    state = {k: v for k, v in model.state_dict().items() if k.startswith(model.encoder_prefixes)}
    state.pop(next(k for k in state if k.endswith("conv1.weight")))
    with pytest.raises(ValueError, match=f"init_state_dict lacks 1 encoder keys of '{name}'"):
        build_task_model(name, **_task(name), init_state_dict=state)


def test_checkpoint_of_another_size_is_refused():
    full_size_stem = {"stem.conv1.weight": torch.zeros(80, 10, 1, 1)}  # a nano CoreEncoder key into a tiny model
    with pytest.raises(RuntimeError, match="size mismatch"):
        build_task_model("geoaware-core-nano-tiny", init_state_dict=full_size_stem)


def test_resnet_trains_its_encoder_unless_the_original_freeze_is_asked_for():
    assert all(p.requires_grad for p in build("resnet50-tiny").parameters())
    model = build("resnet50-tiny", freeze_encoder_always=True)  # the bench's resnet(): encoder always frozen
    assert not any(p.requires_grad for p in model.encoder.parameters())
    assert all(p.requires_grad for n, p in model.named_parameters() if not n.startswith("encoder."))
