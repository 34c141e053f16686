"""Models (Geo-Aware U-Net, ...) and a registry: `build("geoaware-unet-44m")`, `list_models()`."""

from .geoaware_unet import GeoAwareUNet, geoaware_unet_44m, geoaware_unet_200m, geoaware_unet_tiny
from .registry import build, list_models, register

register("geoaware-unet-44m")(geoaware_unet_44m)
register("geoaware-unet-200m")(geoaware_unet_200m)
register("geoaware-unet-tiny")(geoaware_unet_tiny)

__all__ = ["GeoAwareUNet", "build", "list_models", "register"]
