"""Task heads: turn any registered encoder into a dense regression or segmentation model for fine-tuning.

    model = build_task_model("phileo-vit", task="segmentation", init_state_dict=ckpt, freeze_encoder=True)
    logits = model(x)                      # (B, 11, H, W); regression: (B, 1, H, W), raw values (no sigmoid)
    model.encoder_parameters()             # the pretrained encoder: what freeze_encoder froze

What each family becomes (the PhilEO Bench choices):
* geoaware-unet-*: the whole U-Net (stem, encoder, decoder) with a new head CNNBlock (1 or 11 channels, no
  output activation). The pretrained decoder is loaded too; the encoder is stem + encoder.
* vit-upernet-* (downstream models): the model itself with out_chans 1 or 11 (UPerHead output).
* phileo-vit*, vit-upernet-*-pretrain: a ViTUPerNet (the "ViT UPerNet 100M" structure: stem, PhilEO ViT encoder,
  "bench" pyramid, UPerHead) with the same encoder configuration and evenly spread taps.

task="classification" (per-patch logits (B, num_classes)), as the bench's classifiers:
* a zoo model (`is_downstream`): its registered `<name>-classifier` variant, built whole.
* geoaware-unet-*: stem + encoder, the deepest feature map average-pooled -> Linear (the bench's
  GeoAware_core_nano_classifier: CoreEncoder.head, pb/models/model_CoreCNN.py CoreEncoder).
* phileo-vit*, vit-upernet-*: stem + ViT encoder, the normed CLS token -> Linear, LayerNorm, ReLU, Linear
  (the bench's vit_cnn_classifier, models/model_AutoEncoderViTPretrained_classifier.py ViTCNN_Classifier).

Every task model keeps the state-dict names of the family's original model, so `load_encoder` maps a
pretraining checkpoint (PhilEO_CNN / PhilEO_ViT keys, optionally DDP "module." prefixed) onto it. Parameters
the dense forward does not use (the pretraining geo heads and CLS projection, kept so that checkpoints load
by name) are frozen, so DDP needs no find_unused_parameters. Frozen-encoder mode freezes the stem too; the
bench's `phivit_upernet_pretrained(freeze_body=True)` left the stem trainable (PhilEO-MajorTOM
phileo-bench/models/model_PhiViTUperNet.py:604-607).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch
import torch.nn as nn

from .blocks import CNNBlock
from .geoaware_unet import NUM_LANDCOVER_CLASSES, EncoderOutput, GeoAwareUNet, pool_deepest_map
from .registry import build, list_models
from .upernet import PhilEOViTUPerNet, ViTUPerNet, default_taps
from .vit import PhilEOViT, check_input

TASK_OUTPUTS: dict[str, int] = {"regression": 1, "segmentation": NUM_LANDCOVER_CLASSES}


class DenseGeoAwareUNet(nn.Module):
    """A Geo-Aware U-Net's stem, encoder and decoder (same modules and key names) with a new dense head."""

    def __init__(self, unet: GeoAwareUNet, out_chans: int) -> None:
        super().__init__()
        self.in_chans, self.out_chans, self.img_size = unet.in_chans, out_chans, unet.img_size
        self.stem, self.encoder, self.decoder = unet.stem, unet.encoder, unet.decoder
        self.head = CNNBlock(
            unet.decoder.dims[-1], out_chans, spatial_size=unet.img_size,
            act_layer=type(unet.head.activation), act_out_layer=nn.Identity,  # raw values / logits
        )
        for module in (self.encoder.head_clouds, self.encoder.head_landcover, self.encoder.head_buildings,
                       self.encoder.head_coords):
            module.requires_grad_(False)  # pretraining-only geo heads: unused by the dense forward
        self.encoder_prefixes: tuple[str, ...] = ("stem.", "encoder.")
        self.pretrained_prefixes: tuple[str, ...] = ("stem.", "encoder.", "decoder.")
        self.pretrained_key_map: dict[str, str] = {}

    def encoder_parameters(self) -> Iterator[nn.Parameter]:
        """The encoder: stem + CNN encoder (what freeze_encoder freezes; the decoder keeps training)."""
        yield from self.stem.parameters()
        yield from self.encoder.parameters()

    def forward_features(self, x: torch.Tensor) -> EncoderOutput:
        check_input(x, self.in_chans, self.img_size)
        return self.encoder(self.stem(x))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, dims[-1]): the pretrained U-Net's embedding (`GeoAwareUNet.encode`)."""
        return pool_deepest_map(self.forward_features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.forward_features(x)
        return self.head(self.decoder(features.embeddings, features.skips))


class GeoAwareUNetClassifier(nn.Module):
    """A Geo-Aware U-Net's stem and encoder, the deepest feature map pooled -> Linear: (B, num_classes) logits."""

    def __init__(self, unet: GeoAwareUNet, num_classes: int) -> None:
        super().__init__()
        self.in_chans, self.out_chans, self.img_size = unet.in_chans, num_classes, unet.img_size
        self.stem, self.encoder = unet.stem, unet.encoder
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten(), nn.Linear(unet.encoder.dims[-1],
                                                                                       num_classes))
        for module in (self.encoder.linear_encode, self.encoder.head_clouds, self.encoder.head_landcover,
                       self.encoder.head_buildings, self.encoder.head_coords):
            module.requires_grad_(False)  # the embedding and geo heads (pretraining only): unused here, so DDP
            # needs no find_unused_parameters
        self.encoder_prefixes: tuple[str, ...] = ("stem.", "encoder.")
        self.pretrained_key_map: dict[str, str] = {}

    def encoder_parameters(self) -> Iterator[nn.Parameter]:
        yield from self.stem.parameters()
        yield from self.encoder.parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.in_chans, self.img_size)
        return self.head(self.encoder(self.stem(x)).embeddings_cnn)


class ViTClassifier(nn.Module):
    """A ViTUPerNet's stem and ViT encoder (same keys), the normed CLS token -> the bench's MLP head."""

    def __init__(self, source: ViTUPerNet, num_classes: int) -> None:
        super().__init__()
        self.in_chans, self.out_chans, self.img_size = source.in_chans, num_classes, source.img_size
        self.stem, self.vit_encoder = source.stem, source.vit_encoder
        width = source.vit.embed_dim
        self.classification_head = nn.Sequential(nn.Linear(width, width // 2), nn.LayerNorm(width // 2), nn.ReLU(),
                                                 nn.Linear(width // 2, num_classes))
        self.encoder_prefixes = source.encoder_prefixes
        self.pretrained_key_map = source.pretrained_key_map

    @property
    def vit(self) -> nn.Module:
        return self.vit_encoder.vit_encoder if hasattr(self.vit_encoder, "vit_encoder") else self.vit_encoder

    def encoder_parameters(self) -> Iterator[nn.Parameter]:
        yield from self.stem.parameters()
        yield from self.vit_encoder.parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.in_chans, self.img_size)
        return self.classification_head(self.vit(self.stem(x))[0][:, 0, :])


def _task_outputs(task: str, num_classes: int | None) -> int:
    if task == "classification":
        if not num_classes or num_classes < 1:
            raise ValueError("task 'classification' needs num_classes >= 1")
        return num_classes
    try:
        return TASK_OUTPUTS[task]
    except KeyError:
        raise ValueError(f"unknown task {task!r}; known: {sorted(TASK_OUTPUTS)} and classification") from None


def classifier_name(name: str) -> str:
    """The registered `<name>-classifier` variant of a zoo model, else `name` itself."""
    if name.endswith("-classifier") or f"{name}-classifier" not in list_models():
        return name
    return f"{name}-classifier"


def _phileo_vit_upernet(probe: nn.Module, out_chans: int) -> ViTUPerNet:
    config = probe.encoder_config()
    # UPerHead width 256 as the bench's (embed 512 and 1024); narrower for the tiny test encoders.
    channels = min(256, config["embed_dim"] // 2)
    return ViTUPerNet(**config, out_chans=out_chans, taps=default_taps(config["depth"]), decoder_channels=channels)


def _per_patch(name: str, probe: nn.Module) -> bool:
    """A zoo classifier: a registered `-classifier` variant, or a model that says so (core-encoder-nano)."""
    return getattr(probe, "is_downstream", False) and (name.endswith("-classifier")
                                                       or getattr(probe, "per_patch_output", False))


def _build_classifier(name: str, probe: nn.Module, num_classes: int, overrides: dict) -> nn.Module:
    if getattr(probe, "is_downstream", False):
        if not _per_patch(name, probe):
            raise ValueError(f"{name!r} has no classifier variant: {name}-classifier is not registered")
        return build(name, **{**overrides, "output_dim": num_classes})
    if isinstance(probe, ViTUPerNet):
        return ViTClassifier(build(name, **overrides), num_classes)
    if isinstance(probe, (PhilEOViT, PhilEOViTUPerNet)):
        return ViTClassifier(_phileo_vit_upernet(probe, 1), num_classes)
    if isinstance(probe, GeoAwareUNet):
        return GeoAwareUNetClassifier(build(name, **overrides), num_classes)
    raise TypeError(f"no classifier head for {name!r} ({type(probe).__name__})")


def build_task_model(
    encoder_name: str,
    task: str = "regression",
    init_state_dict: Mapping[str, torch.Tensor] | None = None,
    freeze_encoder: bool = False,
    num_classes: int | None = None,
    **overrides,
) -> nn.Module:
    """A dense model (or, task="classification", a per-patch classifier of `num_classes`) on the registered
    model `encoder_name` (see the module docstring).

    `overrides` go to the registered factory (e.g. img_size). `init_state_dict` is a pretraining state dict
    (or a checkpoint dict holding one under "model" or "state_dict"), loaded with `load_encoder`. The returned model has
    `encoder_parameters()`; with `freeze_encoder` those have requires_grad=False.
    """
    out_chans = _task_outputs(task, num_classes)
    if task == "classification":
        encoder_name = classifier_name(encoder_name)
    with torch.device("meta"):  # only to find the family and read the configuration: no allocation
        probe = build(encoder_name, **overrides)
    if task == "classification":
        model = _build_classifier(encoder_name, probe, out_chans, overrides)
    elif _per_patch(encoder_name, probe):
        raise ValueError(f"{encoder_name!r} is a per-patch classifier; a {task} task needs a dense model")
    elif getattr(probe, "is_downstream", False):  # a PhilEO Bench zoo model: built whole with its output width
        model = build(encoder_name, **{**overrides, "output_dim": out_chans})
    elif isinstance(probe, ViTUPerNet):
        model: nn.Module = build(encoder_name, **{**overrides, "out_chans": out_chans})
    elif isinstance(probe, (PhilEOViT, PhilEOViTUPerNet)):
        model = _phileo_vit_upernet(probe, out_chans)
    elif isinstance(probe, GeoAwareUNet):
        model = DenseGeoAwareUNet(build(encoder_name, **overrides), out_chans)
    else:
        raise TypeError(f"no task head for {encoder_name!r} ({type(probe).__name__})")
    if init_state_dict is not None:
        missing, _ = load_encoder(model, checkpoint_state_dict(init_state_dict))
        # A wrong checkpoint (other family, renamed keys) must not silently leave the encoder at its random init.
        not_loaded = [k for k in missing if k.startswith(model.encoder_prefixes)]
        if not_loaded:
            raise ValueError(f"init_state_dict lacks {len(not_loaded)} encoder keys of {encoder_name!r}, "
                             f"e.g. {not_loaded[:3]}")
    if freeze_encoder:
        for param in model.encoder_parameters():
            param.requires_grad_(False)
    return model


def checkpoint_state_dict(checkpoint: Mapping) -> Mapping[str, torch.Tensor]:
    """The state dict in a loaded checkpoint: under "model" (ours), under "state_dict" (a pytorch-lightning file,
    e.g. SeCo's), or the mapping itself."""
    for key in ("model", "state_dict"):
        if isinstance(checkpoint.get(key), Mapping):
            return checkpoint[key]
    return checkpoint


def _target_key(key: str, model: nn.Module, own: Mapping[str, torch.Tensor]) -> str | None:
    """The model key a checkpoint key loads into, or None: the key itself, else the first renamed key that exists."""
    if key in own:
        return key
    for source, target in model.pretrained_key_map.items():
        if key.startswith(source) and target + key[len(source):] in own:
            return target + key[len(source):]
    return None


def load_encoder(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    """Load the pretrained part of a checkpoint into a task model (or a downstream ViTUPerNet).

    Loads only keys under the model's `pretrained_prefixes` (default: its `encoder_prefixes`): stem + encoder,
    plus the decoder for the U-Net. PhilEO ViT pretraining keys "encoder.*" map to "vit_encoder.*"; a DDP
    "module." prefix is stripped. Shapes must match (a config mismatch raises). Returns (missing, unexpected):
    model keys left at their init (decoder / head), and checkpoint keys not loaded.
    """
    own = model.state_dict()
    prefixes = getattr(model, "pretrained_prefixes", model.encoder_prefixes)
    selected, unexpected = {}, []
    for key, value in state_dict.items():
        target = _target_key(key.removeprefix("module."), model, own)
        if target is not None and target.startswith(prefixes):
            selected[target] = value
        else:
            unexpected.append(key)
    result = model.load_state_dict(selected, strict=False)
    return list(result.missing_keys), unexpected
