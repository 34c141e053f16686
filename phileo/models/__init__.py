"""Models (Geo-Aware U-Net, PhilEO ViT, ViT UPerNet, the PhilEO Bench CNN and ViT zoo) and a registry:
`build("geoaware-unet-44m")`, `list_models()`."""

from functools import partial

from .geoaware_unet import GeoAwareUNet, geoaware_unet_44m, geoaware_unet_200m, geoaware_unet_tiny
from .registry import build, list_models, register
from .task_heads import build_task_model, load_encoder
from .upernet import (
    PRETRAIN_UPERNET_MODELS,
    UPERNET_MODELS,
    PhilEOViTUPerNet,
    UPerHead,
    ViTUPerNet,
    vit_upernet,
    vit_upernet_pretrain,
)
from .vit import PhilEOViT, phileo_vit, phileo_vit_tiny
from .zoo_cnn import CNN_ZOO
from .zoo_vit import CONFIGS as ZOO_VIT_CONFIGS
from .zoo_vit import ZooViTClassifier, ZooViTDense, build_zoo_vit

register("geoaware-unet-44m")(geoaware_unet_44m)
register("geoaware-unet-200m")(geoaware_unet_200m)
register("geoaware-unet-tiny")(geoaware_unet_tiny)
register("phileo-vit")(phileo_vit)
register("phileo-vit-tiny")(phileo_vit_tiny)
for _name in UPERNET_MODELS:
    register(_name)(partial(vit_upernet, _name))
for _name in PRETRAIN_UPERNET_MODELS:
    register(_name)(partial(vit_upernet_pretrain, _name))
for _name, _factory in CNN_ZOO.items():
    register(_name)(_factory)
# The PhilEO Bench zoo's ViTs (prithvi-100m, satmae, vit-cnn, vit-cnn-gc, their -tiny), each also as -classifier.
for _name in ZOO_VIT_CONFIGS:
    register(_name)(partial(build_zoo_vit, _name))
    register(f"{_name}-classifier")(partial(build_zoo_vit, _name, classifier=True))

__all__ = [
    "GeoAwareUNet",
    "PhilEOViT",
    "PhilEOViTUPerNet",
    "UPerHead",
    "ViTUPerNet",
    "ZooViTClassifier",
    "ZooViTDense",
    "build",
    "build_task_model",
    "list_models",
    "load_encoder",
    "register",
]
