"""PhilEO ViT: the original `PhilEO_ViT` (`model/phileo_vit.py`), pretrained like the Geo-Aware U-Net.

stem CNNBlock -> ViT encoder (timm PatchEmbed + CLS + fixed 2-D sin-cos positions + timm Blocks + LN) ->
CLS token -> Linear = embeddings -> geo heads; the token sequence -> transformer decoder -> 1x1 conv ->
bilinear upsampling -> head CNNBlock with a sigmoid (reconstruction).

Module and attribute names equal the original's, so its state dicts load with strict=True
(tests/data/phileo_vit_state_dict.txt is the original's listing). Bugs of the original fixed here
(ESA-PhiLab/PhilEO-MajorTOM model/phileo_vit.py:288 and :336-343): the decoder reshaped the tokens to
img/4 (patch size 4 hard-coded) and hard-coded its depth (12) and heads (8); both are now arguments,
with the original's values as defaults. The unused `np.float` position helper is not ported.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block

from .blocks import ActLayer, CNNBlock
from .geoaware_unet import NUM_CLOUD_CLASSES, NUM_LANDCOVER_CLASSES, GeoPredictions


def sincos_pos_embed_2d(embed_dim: int, grid_size: int, cls_token: bool = True) -> torch.Tensor:
    """Fixed MAE 2-D sine-cosine position embedding, (1 + grid_size**2, embed_dim) float32 (CLS row = 0).

    Same values and layout as MAE's numpy `get_2d_sincos_pos_embed` (computed in float64, then cast): the
    first half of the channels encodes the column index, the second half the row index, tokens row-major.
    """
    if embed_dim % 4:
        raise ValueError(f"embed_dim must be divisible by 4 for a 2-D sin-cos embedding, got {embed_dim}")
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    emb = torch.cat([_sincos_1d(embed_dim // 2, cols.reshape(-1)), _sincos_1d(embed_dim // 2, rows.reshape(-1))], 1)
    if cls_token:
        emb = torch.cat([emb.new_zeros(1, embed_dim), emb], dim=0)
    return emb.float()


def _sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    angles = positions[:, None] * omega[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def init_linear_and_norm_(model: nn.Module) -> None:
    """MAE's `_init_weights`: xavier-uniform Linear weights, zero biases, LayerNorm 1 / 0."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def run_blocks(blocks: nn.ModuleList, norm: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The transformer blocks over tokens x: (normed output, every block's output with the last one normed)."""
    hidden_states = []
    for block in blocks:
        x = block(x)
        hidden_states.append(x)
    x = norm(x)
    hidden_states[-1] = x
    return x, hidden_states


def _layer_norm(eps: float) -> partial:
    return partial(nn.LayerNorm, eps=eps)


class ViTEncoder(nn.Module):
    """MAE-style ViT: patch embedding, CLS token, fixed sin-cos positions, `depth` timm Blocks, final LN.

    `pos_embed` is an nn.Parameter with requires_grad=False, as in the original: the name is a state-dict
    key of the published checkpoints, and the original's parameter counts include its values.
    """

    def __init__(
        self,
        *,
        img_size: int = 128,
        patch_size: int = 4,
        in_chans: int = 10,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} must be divisible by patch_size {patch_size}")
        self.img_size = img_size
        self.patch_size = patch_size
        self.grid_size = img_size // patch_size
        self.embed_dim = embed_dim
        self.depth = depth
        # Registration order = the original's, so state-dict order (and optimizer state order) matches.
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid_size**2 + 1, embed_dim), requires_grad=False)
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, norm_layer=_layer_norm(norm_eps))
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The original (MAE) init: xavier Linear layers and patch projection, N(0, 0.02) CLS, LN 1/0."""
        with torch.no_grad():
            pos = sincos_pos_embed_2d(self.embed_dim, self.grid_size, cls_token=True)
            self.pos_embed.copy_(pos.to(self.pos_embed.device).unsqueeze(0))
        weight = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))  # like an nn.Linear over a flattened patch
        nn.init.normal_(self.cls_token, std=0.02)
        init_linear_and_norm_(self)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(B, C, H, W) -> (normed tokens (B, 1+N, D), every block's output with the last one normed)."""
        x = self.patch_embed(x) + self.pos_embed[:, 1:, :]
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        return run_blocks(self.blocks, self.norm, x)


class ViTFeatures(NamedTuple):
    """Output of FoundationViTEncoder."""

    embeddings: torch.Tensor  # (B, latent_dim): Linear of the normed CLS token
    vit_output: torch.Tensor  # (B, 1+N, D) normed tokens
    hidden_states: list[torch.Tensor]  # depth x (B, 1+N, D); the last one is vit_output
    predictions: GeoPredictions


class FoundationViTEncoder(nn.Module):
    """ViTEncoder, then CLS token -> `linear_proj` (no norm) = embeddings -> the U-Net's four geo heads."""

    def __init__(self, *, latent_dim: int = 1024, **vit_kwargs) -> None:
        super().__init__()
        self.vit_encoder = ViTEncoder(**vit_kwargs)
        self.latent_dim = latent_dim
        self.linear_proj = nn.Linear(self.vit_encoder.embed_dim, latent_dim)
        # Plain Linear for clouds/landcover and Sequential(Linear, Sigmoid) for the others: the original's keys.
        self.head_clouds = nn.Linear(latent_dim, NUM_CLOUD_CLASSES)
        self.head_landcover = nn.Linear(latent_dim, NUM_LANDCOVER_CLASSES)
        self.head_buildings = nn.Sequential(nn.Linear(latent_dim, 1), nn.Sigmoid())
        self.head_coords = nn.Sequential(nn.Linear(latent_dim, 4), nn.Sigmoid())

    def geo_modules(self) -> list[nn.Module]:
        """The CLS projection and the geo heads: used by pretraining only."""
        return [self.linear_proj, self.head_clouds, self.head_landcover, self.head_buildings, self.head_coords]

    def forward(self, x: torch.Tensor) -> ViTFeatures:
        vit_output, hidden_states = self.vit_encoder(x)
        embeddings = self.linear_proj(vit_output[:, 0, :])
        predictions = GeoPredictions(
            coords=self.head_coords(embeddings),
            clouds=self.head_clouds(embeddings),
            buildings=self.head_buildings(embeddings),
            landcover=self.head_landcover(embeddings),
        )
        return ViTFeatures(embeddings, vit_output, hidden_states, predictions)


def tokens_to_map(tokens: torch.Tensor, grid_size: int) -> torch.Tensor:
    """(B, 1+N, D) tokens -> (B, D, g, g) feature map, dropping the CLS token."""
    batch, _, dim = tokens.shape
    return tokens[:, 1:, :].reshape(batch, grid_size, grid_size, dim).permute(0, 3, 1, 2)


class FoundationViTDecoder(nn.Module):
    """Transformer blocks on the encoder tokens -> LN -> token map -> 1x1 conv -> bilinear upsampling."""

    def __init__(
        self,
        *,
        out_chans: int,
        img_size: int,
        patch_size: int,
        embed_dim: int,
        depth: int = 12,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.img_size = img_size
        self.grid_size = img_size // patch_size  # the original hard-coded img_size // 4 (phileo_vit.py:288)
        # The original leaves these blocks at PyTorch's default init (only the encoder gets the MAE init).
        self.decoder_blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, norm_layer=_layer_norm(norm_eps))
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps)
        self.reconstruction_layer = nn.Conv2d(embed_dim, out_chans, kernel_size=1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        for block in self.decoder_blocks:
            tokens = block(tokens)
        x = self.reconstruction_layer(tokens_to_map(self.norm(tokens), self.grid_size))
        return F.interpolate(x, size=(self.img_size, self.img_size), mode="bilinear", align_corners=False)


class PhilEOViTOutput(NamedTuple):
    """The original PhilEO_ViT 5-tuple, with names; same structure as GeoAwareUNetOutput."""

    reconstruction: torch.Tensor  # (B, out_chans, H, W) sigmoid
    embeddings: torch.Tensor  # (B, latent_dim)
    vit_output: torch.Tensor  # (B, 1+N, D)
    decoded: torch.Tensor  # (B, in_chans, H, W)
    predictions: GeoPredictions


def check_input(x: torch.Tensor, in_chans: int, img_size: int) -> None:
    """The stem's LayerNorms and the patch grid are tied to one input size: fail with a clear message."""
    expected = (in_chans, img_size, img_size)
    if x.ndim != 4 or tuple(x.shape[1:]) != expected:
        raise ValueError(f"expected input (B, {', '.join(map(str, expected))}), got {tuple(x.shape)}")


class ViTPretrainingModel(nn.Module):
    """What PhilEO's ViT pretraining models share: stem + FoundationViTEncoder, a decoder, a sigmoid head.

    Subclasses build `self.decoder` between `_init_stem_encoder` and `_init_head` (attribute order =
    state-dict order, as the original) and name the encoder output the decoder reads (`decoder_input`).
    """

    decoder_input = "vit_output"

    def _init_stem_encoder(self, *, in_chans: int, out_chans: int | None, img_size: int, patch_size: int,
                           embed_dim: int, depth: int, num_heads: int, mlp_ratio: float, latent_dim: int,
                           norm_eps: float, act_layer: ActLayer) -> None:
        self.in_chans, self.img_size = in_chans, img_size
        self.out_chans = in_chans if out_chans is None else out_chans
        self.num_features = latent_dim
        self._encoder_config = dict(
            in_chans=in_chans, img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
            num_heads=num_heads, mlp_ratio=mlp_ratio, latent_dim=latent_dim, norm_eps=norm_eps, act_layer=act_layer,
        )
        self.stem = CNNBlock(in_chans, in_chans, spatial_size=img_size, act_layer=act_layer)
        self.encoder = FoundationViTEncoder(
            latent_dim=latent_dim, img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
            depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, norm_eps=norm_eps,
        )

    def _init_head(self, act_layer: ActLayer) -> None:
        self.head = CNNBlock(
            self.in_chans, self.out_chans, spatial_size=self.img_size, act_layer=act_layer, act_out_layer=nn.Sigmoid
        )

    def encoder_config(self) -> dict:
        """Keyword arguments that rebuild this encoder (stem + ViT) in another model, e.g. a ViTUPerNet."""
        return dict(self._encoder_config)

    def forward_features(self, x: torch.Tensor) -> ViTFeatures:
        """Stem + encoder: embeddings, normed tokens, hidden states and geo-head predictions."""
        check_input(x, self.in_chans, self.img_size)
        return self.encoder(self.stem(x))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, embed_dim) embedding per image: the ViT's normed CLS token (`phileo-train embed`)."""
        return self.forward_features(x).vit_output[:, 0]

    def forward(self, x: torch.Tensor) -> PhilEOViTOutput:
        features = self.forward_features(x)
        decoded = self.decoder(getattr(features, self.decoder_input))
        return PhilEOViTOutput(
            self.head(decoded), features.embeddings, features.vit_output, decoded, features.predictions
        )


class PhilEOViT(ViTPretrainingModel):
    """The PhilEO ViT pretraining model (original `PhilEO_ViT`): reconstruction + embeddings + geo heads.

    `act_layer` (the stem and head CNNBlocks only) defaults to LeakyReLU, as the original. The decoder's
    depth and heads default to the original's hard-coded 12 and 8.
    """

    def __init__(
        self,
        *,
        in_chans: int = 10,
        out_chans: int | None = None,
        img_size: int = 128,
        patch_size: int = 4,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        latent_dim: int = 512,
        decoder_depth: int = 12,
        decoder_num_heads: int = 8,
        norm_eps: float = 1e-5,
        act_layer: ActLayer = "leaky_relu",
    ) -> None:
        super().__init__()
        self._init_stem_encoder(
            in_chans=in_chans, out_chans=out_chans, img_size=img_size, patch_size=patch_size, embed_dim=embed_dim,
            depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, latent_dim=latent_dim, norm_eps=norm_eps,
            act_layer=act_layer,
        )
        self.decoder = FoundationViTDecoder(
            out_chans=in_chans, img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=decoder_depth,
            num_heads=decoder_num_heads, mlp_ratio=mlp_ratio, norm_eps=norm_eps,
        )
        self._init_head(act_layer)


# Named configurations (timm style). Every field can be overridden: build("phileo-vit", depth=24).
_CONFIGS: dict[str, dict] = {
    # The pretraining run (train_model_vit_ddp.py): 141,178,690 parameters (524,800 of them the frozen pos_embed).
    "phileo-vit": dict(embed_dim=512, depth=32, num_heads=16, latent_dim=1024),
    # Tests / smoke runs: same 10x128x128 input and patch 4 (1024 tokens), small widths, 2 decoder blocks.
    "phileo-vit-tiny": dict(embed_dim=64, depth=4, num_heads=4, latent_dim=32, decoder_depth=2, decoder_num_heads=4),
}
_DEFAULTS = dict(in_chans=10, img_size=128, patch_size=4, mlp_ratio=4.0, act_layer="leaky_relu")


def phileo_vit(**overrides) -> PhilEOViT:
    return PhilEOViT(**{**_DEFAULTS, **_CONFIGS["phileo-vit"], **overrides})


def phileo_vit_tiny(**overrides) -> PhilEOViT:
    return PhilEOViT(**{**_DEFAULTS, **_CONFIGS["phileo-vit-tiny"], **overrides})
