"""Factories of the PhilEO Bench CNN models (the CNN half of the model zoo), by registry name.

Each factory is `factory(output_dim=1, **overrides)` and returns a downstream model (phileo/models/downstream.py).
Registry name -> the bench's name in training_script.py (`get_models` / `get_models_pretrained`):

    baseline-cnn                    baseline_cnn                     models/model_Baseline.py BaselineNet
    core-unet-nano                  core_unet_nano                   models/model_CoreCNN_versions.py CoreUnet_nano
    core-encoder-nano               core_encoder_nano (classifier)   models/model_CoreCNN_versions.py Core_nano
    geoaware-core-nano              GeoAware_core_nano               models/model_GeoAwarePretrained.py
    geoaware-core-nano-classifier   GeoAware_core_nano_classifier    models/model_GeoAwarePretrained_classifier.py
    resnet50                        resnet / resnet_imagenet         models/model_Resnet50.py Resnet50
    resnet50-classifier             resnet_imagenet_classifier       models/model_Resnet50.py Resnet50_Classifier
    seco-resnet50                   seasonal_contrast                models/model_Seco.py Seco
    seco-resnet50-classifier        seasonal_contrast_classifier     models/model_Seco.py Seco_Classifier

resnet50 is the bench's "resnet" without --init and "resnet_imagenet" with an ImageNet file as --init.
`<name>-tiny` (and `<name>-tiny-classifier`) are the same classes at test size.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch.nn as nn

from .baseline_cnn import BaselineNet
from .core_unet import CORE_NANO_DEPTHS, CORE_NANO_DIMS, CoreEncoder, CoreUnet
from .geoaware_core import GeoAwareCoreClassifier, GeoAwareCoreUnet
from .resnet import SECO_KEY_MAP, ResNetClassifier, ResNetDecoder, SecoClassifier

TINY_DEPTHS: tuple[int, ...] = (1, 1, 1, 1)
TINY_DIMS: tuple[int, ...] = (16, 32, 48, 64)
TINY_DECODER = {"decoder_depths": TINY_DEPTHS, "decoder_dims": TINY_DIMS}


def baseline_cnn(output_dim: int = 1, **overrides) -> BaselineNet:
    return BaselineNet(output_dim=output_dim, **overrides)


def core_unet(output_dim: int = 1, depths=CORE_NANO_DEPTHS, dims=CORE_NANO_DIMS, **overrides) -> CoreUnet:
    # CoreUnet_nano passes 2x the CoreEncoder nano widths, which CoreUnet halves (models/model_CoreCNN_versions.py).
    return CoreUnet(output_dim=output_dim, depths=depths, dims=[2 * d for d in dims], **overrides)


def core_encoder(output_dim: int = 1, depths=CORE_NANO_DEPTHS, dims=CORE_NANO_DIMS, **overrides) -> CoreEncoder:
    return CoreEncoder(output_dim=output_dim, depths=depths, dims=dims, **overrides)


def seco_resnet50(output_dim: int = 1, **overrides) -> ResNetDecoder:
    return ResNetDecoder(output_dim, key_map=SECO_KEY_MAP, **overrides)


def _positional(cls: Callable[..., nn.Module], **fixed) -> Callable[..., nn.Module]:
    def factory(output_dim: int = 1, **overrides) -> nn.Module:
        return cls(output_dim, **{**fixed, **overrides})
    return factory


CNN_ZOO: dict[str, Callable[..., nn.Module]] = {
    "baseline-cnn": baseline_cnn,
    "baseline-cnn-tiny": partial(baseline_cnn, width=16),
    "core-unet-nano": core_unet,
    "core-unet-nano-tiny": partial(core_unet, depths=TINY_DEPTHS, dims=TINY_DIMS),
    "core-encoder-nano": core_encoder,
    "core-encoder-nano-tiny": partial(core_encoder, depths=TINY_DEPTHS, dims=TINY_DIMS),
    "geoaware-core-nano": _positional(GeoAwareCoreUnet),
    "geoaware-core-nano-classifier": _positional(GeoAwareCoreClassifier),
    "geoaware-core-nano-tiny": _positional(GeoAwareCoreUnet, depths=TINY_DEPTHS, dims=TINY_DIMS),
    "geoaware-core-nano-tiny-classifier": _positional(GeoAwareCoreClassifier, depths=TINY_DEPTHS, dims=TINY_DIMS),
    "resnet50": _positional(ResNetDecoder),
    "resnet50-classifier": _positional(ResNetClassifier),
    "resnet50-tiny": _positional(ResNetDecoder, body="tiny", **TINY_DECODER),
    "resnet50-tiny-classifier": _positional(ResNetClassifier, body="tiny"),
    "seco-resnet50": seco_resnet50,
    "seco-resnet50-classifier": _positional(SecoClassifier),
    "seco-resnet50-tiny": partial(seco_resnet50, body="tiny", **TINY_DECODER),
    "seco-resnet50-tiny-classifier": _positional(SecoClassifier, body="tiny"),
}
