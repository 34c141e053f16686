"""Geo-Aware U-Net: the original `PhilEO_CNN` (`model/phileo_cnn.py`), 44M and 200M configurations.

stem CNNBlock -> FoundationEncoder (CNN stages, max-pool downsampling, flatten -> Linear -> LN =
embeddings, geo heads) -> FoundationDecoder (Linear -> reshape, ScaleSkip2D merges of the encoder
skips, bilinear upsampling) -> head CNNBlock with a sigmoid (reconstruction).

Module and attribute names equal the original's, so its state dicts load with strict=True for every
configuration whose stages all have more than one block (44M, 200M; see `_stage_scaler`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn as nn

from .blocks import ActLayer, CNNBlock, ScaleSkip2D, resolve_act_layer

NUM_CLOUD_CLASSES = 4
NUM_LANDCOVER_CLASSES = 11


class GeoPredictions(NamedTuple):
    """Outputs of the geo heads on the embeddings."""

    coords: torch.Tensor  # (B, 4) sigmoid: encoded lat/lon
    clouds: torch.Tensor  # (B, 4) logits
    buildings: torch.Tensor  # (B, 1) sigmoid: building density
    landcover: torch.Tensor  # (B, 11) logits


class EncoderOutput(NamedTuple):
    embeddings: torch.Tensor  # (B, latent_dim)
    embeddings_cnn: torch.Tensor  # (B, dims[-1], s, s), s = img_size / 2**(stages-1)
    skips: list[torch.Tensor]  # one per stage, highest resolution first
    predictions: GeoPredictions


class GeoAwareUNetOutput(NamedTuple):
    """The original PhilEO_CNN 5-tuple, with names."""

    reconstruction: torch.Tensor  # (B, out_chans, H, W) sigmoid
    embeddings: torch.Tensor  # (B, latent_dim)
    embeddings_cnn: torch.Tensor  # (B, dims[-1], s, s)
    decoded: torch.Tensor  # (B, dims[0], H, W)
    predictions: GeoPredictions


def _stage_sizes(img_size: int, num_stages: int) -> list[int]:
    """Spatial size of each stage, highest resolution first (img, img/2, ...)."""
    if img_size % 2 ** (num_stages - 1):
        raise ValueError(f"img_size {img_size} must be divisible by 2**{num_stages - 1} for {num_stages} stages")
    return [img_size // 2**i for i in range(num_stages)]


def _stage_scaler(channels: int, depth: int) -> nn.Module:
    """Residual merge around a stage, applied only when the stage has more than one block.

    The original builds a ScaleSkip2D for every stage, so a depth-1 stage carried parameters that never
    receive a gradient (DDP then needs find_unused_parameters). We put a parameter-free placeholder
    there instead; the other indices, hence state-dict names, are unchanged.
    """
    return ScaleSkip2D(channels) if depth > 1 else nn.Identity()


def _run_stage(blocks: nn.ModuleList, scaler: nn.Module, x: torch.Tensor) -> torch.Tensor:
    stage_input = x
    for block in blocks:
        x = block(x)
    if len(blocks) > 1:
        x = scaler(x, stage_input)
    return x


class FoundationEncoder(nn.Module):
    """CNN stages (highest resolution first) -> flattened lowest-resolution map -> embeddings + geo heads."""

    def __init__(
        self, *, depths: Sequence[int], dims: Sequence[int], img_size: int, latent_dim: int, act_layer: ActLayer
    ) -> None:
        super().__init__()
        if len(depths) != len(dims):
            raise ValueError(f"depths {list(depths)} and dims {list(dims)} must have the same length")
        make_act = resolve_act_layer(act_layer)
        sizes = _stage_sizes(img_size, len(depths))
        self.depths = list(depths)
        self.dims = list(dims)
        self.linear_dim = sizes[-1] ** 2 * dims[-1]

        self.downsample = nn.ModuleList(
            nn.Sequential(nn.Conv2d(dims[i], dims[i + 1], 1), nn.MaxPool2d(2, stride=2)) for i in range(len(dims) - 1)
        )
        self.block_scalers = nn.ModuleList(_stage_scaler(dim, depth) for dim, depth in zip(dims, depths))
        self.blocks_down = nn.ModuleList(
            nn.ModuleList(CNNBlock(dim, spatial_size=size, act_layer=act_layer) for _ in range(depth))
            for dim, size, depth in zip(dims, sizes, depths)
        )
        self.prelinear_norm = nn.LayerNorm([dims[-1], sizes[-1], sizes[-1]])
        self.linear_encode = nn.Sequential(make_act(), nn.Linear(self.linear_dim, latent_dim), nn.LayerNorm(latent_dim))
        self.head_clouds = nn.Sequential(nn.Linear(latent_dim, NUM_CLOUD_CLASSES))
        self.head_landcover = nn.Sequential(nn.Linear(latent_dim, NUM_LANDCOVER_CLASSES))
        self.head_buildings = nn.Sequential(nn.Linear(latent_dim, 1), nn.Sigmoid())
        self.head_coords = nn.Sequential(nn.Linear(latent_dim, 4), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> EncoderOutput:
        skips = []
        for stage, (blocks, scaler) in enumerate(zip(self.blocks_down, self.block_scalers)):
            x = _run_stage(blocks, scaler, x)
            skips.append(x)
            if stage < len(self.downsample):
                x = self.downsample[stage](x)

        embeddings_cnn = self.prelinear_norm(x)
        embeddings = self.linear_encode(embeddings_cnn.flatten(1))
        predictions = GeoPredictions(
            coords=self.head_coords(embeddings),
            clouds=self.head_clouds(embeddings),
            buildings=self.head_buildings(embeddings),
            landcover=self.head_landcover(embeddings),
        )
        return EncoderOutput(embeddings, embeddings_cnn, skips, predictions)


class FoundationDecoder(nn.Module):
    """Embeddings -> lowest-resolution map -> stages merged with the encoder skips, upsampled x2 each.

    `depths`, `dims` and `dropout` are in decoder order (lowest resolution first), as in the original.
    `dropout[i]` is the GaussianDropout2d probability on stage i's skip connection.
    """

    def __init__(
        self,
        *,
        depths: Sequence[int],
        dims: Sequence[int],
        img_size: int,
        latent_dim: int,
        dropout: float | Sequence[float] | None,
        act_layer: ActLayer,
    ) -> None:
        super().__init__()
        num_stages = len(depths)
        if len(dims) != num_stages:
            raise ValueError(f"depths {list(depths)} and dims {list(dims)} must have the same length")
        dropouts = _per_stage_dropout(dropout, num_stages)
        make_act = resolve_act_layer(act_layer)
        sizes = _stage_sizes(img_size, num_stages)[::-1]
        self.dims = list(dims)
        self.latent_size = sizes[0]

        self.linear_decode = nn.Linear(latent_dim, sizes[0] ** 2 * dims[0])
        self.latent_norm = nn.LayerNorm([dims[0], sizes[0], sizes[0]])
        self.prehead_norm = nn.LayerNorm([dims[-1], sizes[-1], sizes[-1]])
        self.skip_scalers = nn.ModuleList(ScaleSkip2D(dim, drop_y=p) for dim, p in zip(dims, dropouts))
        self.block_scalers = nn.ModuleList(_stage_scaler(dim, depth) for dim, depth in zip(dims, depths))
        self.blocks_up = nn.ModuleList(
            nn.ModuleList(CNNBlock(dim, spatial_size=size, act_layer=act_layer) for _ in range(depth))
            for dim, size, depth in zip(dims, sizes, depths)
        )
        self.upsamplers = nn.ModuleList(
            nn.Sequential(
                nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),  # = UpsamplingBilinear2d
                nn.Conv2d(dims[i], dims[i + 1], 3, padding=1, bias=False, padding_mode="replicate"),
                nn.LayerNorm([dims[i + 1], sizes[i + 1], sizes[i + 1]]),
                make_act(),
            )
            for i in range(num_stages - 1)
        )

    def forward(self, embeddings: torch.Tensor, skips: Sequence[torch.Tensor]) -> torch.Tensor:
        x = self.linear_decode(embeddings)
        x = self.latent_norm(x.reshape(-1, self.dims[0], self.latent_size, self.latent_size))
        for stage, (skip_scaler, blocks, scaler) in enumerate(
            zip(self.skip_scalers, self.blocks_up, self.block_scalers)
        ):
            x = skip_scaler(x, skips[-(stage + 1)])
            x = _run_stage(blocks, scaler, x)
            if stage < len(self.upsamplers):
                x = self.upsamplers[stage](x)
        return self.prehead_norm(x)


def _per_stage_dropout(dropout: float | Sequence[float] | None, num_stages: int) -> list[float]:
    if dropout is None:
        return [0.0] * num_stages
    if isinstance(dropout, (int, float)):
        return [float(dropout)] * num_stages
    if len(dropout) != num_stages:
        raise ValueError(f"dropout needs one value per stage ({num_stages}), got {list(dropout)}")
    return [float(p) for p in dropout]


def pool_deepest_map(features: EncoderOutput) -> torch.Tensor:
    """Global average pool of the encoder's lowest-resolution map (after its LayerNorm): the CNN embedding."""
    return features.embeddings_cnn.mean(dim=(-2, -1))


class GeoAwareUNet(nn.Module):
    """The Geo-Aware U-Net (original `PhilEO_CNN`): reconstruction + embeddings + geo predictions.

    All LayerNorms span whole feature maps, so the model accepts only (in_chans, img_size, img_size)
    inputs. `act_layer` defaults to GELU, as the paper's pretraining runs (the original class
    defaulted to LeakyReLU).
    """

    def __init__(
        self,
        *,
        depths: Sequence[int],
        dims: Sequence[int],
        in_chans: int = 10,
        out_chans: int | None = None,
        img_size: int = 128,
        latent_dim: int = 1024,
        dropout: float | Sequence[float] | None = None,
        act_layer: ActLayer = "gelu",
    ) -> None:
        super().__init__()
        self.in_chans = in_chans
        self.out_chans = in_chans if out_chans is None else out_chans
        self.img_size = img_size
        self.num_features = latent_dim  # timm convention: width of forward_features' pooled output

        self.stem = CNNBlock(in_chans, dims[0], spatial_size=img_size, act_layer=act_layer)
        self.encoder = FoundationEncoder(
            depths=depths, dims=dims, img_size=img_size, latent_dim=latent_dim, act_layer=act_layer
        )
        self.decoder = FoundationDecoder(
            depths=list(depths)[::-1],
            dims=list(dims)[::-1],
            img_size=img_size,
            latent_dim=latent_dim,
            dropout=dropout,
            act_layer=act_layer,
        )
        self.head = CNNBlock(
            dims[0], self.out_chans, spatial_size=img_size, act_layer=act_layer, act_out_layer=nn.Sigmoid
        )

    def _check_input(self, x: torch.Tensor) -> None:
        expected = (self.in_chans, self.img_size, self.img_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"expected input (B, {', '.join(map(str, expected))}), got {tuple(x.shape)}")

    def forward_features(self, x: torch.Tensor) -> EncoderOutput:
        """Stem + encoder: embeddings, lowest-resolution map, skips and geo-head predictions."""
        self._check_input(x)
        return self.encoder(self.stem(x))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, dims[-1]) embedding per image: global average pool of the deepest encoder map (`phileo-train embed`)."""
        return pool_deepest_map(self.forward_features(x))

    def forward(self, x: torch.Tensor) -> GeoAwareUNetOutput:
        features = self.forward_features(x)
        decoded = self.decoder(features.embeddings, features.skips)
        reconstruction = self.head(decoded)
        return GeoAwareUNetOutput(
            reconstruction, features.embeddings, features.embeddings_cnn, decoded, features.predictions
        )


# Named configurations (timm style: blocks -> model -> configs). Every field can be overridden.
_CONFIGS: dict[str, dict] = {
    # Paper "44M" run (train_model_ddp.py:150-158): 43,667,714 parameters.
    "geoaware-unet-44m": dict(depths=[3, 3, 4, 4, 5], dims=[32, 32, 64, 64, 128], latent_dim=1024),
    # Paper "200M" (further_experiments/training_script.py:3960-3961): 223,216,378 parameters.
    "geoaware-unet-200m": dict(depths=[3, 3, 12, 12, 5], dims=[86, 86, 256, 256, 512], latent_dim=1024),
    # Tests / smoke runs: same 10x128x128 input; one 2-block stage per side exercises the stage scalers.
    "geoaware-unet-tiny": dict(depths=[1, 1, 1, 1, 2], dims=[4, 4, 8, 8, 16], latent_dim=64),
}
_DEFAULTS = dict(in_chans=10, img_size=128, dropout=None, act_layer="gelu")


def _build(name: str, overrides: dict) -> GeoAwareUNet:
    return GeoAwareUNet(**{**_DEFAULTS, **_CONFIGS[name], **overrides})


def geoaware_unet_44m(**overrides) -> GeoAwareUNet:
    return _build("geoaware-unet-44m", overrides)


def geoaware_unet_200m(**overrides) -> GeoAwareUNet:
    return _build("geoaware-unet-200m", overrides)


def geoaware_unet_tiny(**overrides) -> GeoAwareUNet:
    return _build("geoaware-unet-tiny", overrides)
