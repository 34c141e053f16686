"""The ViT encoders of the PhilEO Bench model zoo that phileo.models.vit does not already have.

* `PrithviViTEncoder`: Prithvi-100M's MAE encoder (the bench's models/models_Prithvi.py PrithviEncoder): the plain
  MAE ViT of vit.py with a Conv3d patch embedding over (frames, H, W) and a 3-D sin-cos position table.
* `GroupedChannelViTEncoder`: SatMAE's grouped-channel ViT (models/model_SatMAE.py ViTGroupedChannelsEncoder), also
  the encoder of the bench's vit_cnn_gc: one patch embedding per band group, tokens = groups x patches.

The plain MAE ViT of vit_cnn (models/model_AutoEncoderViTPretrained.py ViTEncoder) is vit.py `ViTEncoder`: same
keys, same maths (CLS + pos_embed[0], fixed 2-D sin-cos table, timm Blocks, final LN).

Every encoder here returns (normed tokens (B, 1+N, D), every block's output with the last one normed), as
vit.py ViTEncoder, and knows how to lay its patch tokens out as a feature map (`tokens_to_map`).
Position (and channel) tables are nn.Parameters with requires_grad=False, as the originals (MAE's design):
they are state-dict keys of the published checkpoints and counted in the originals' parameter counts.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import numpy as np
import torch
import torch.nn as nn
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block

from .vit import ViTEncoder, init_linear_and_norm_, run_blocks, sincos_pos_embed_2d

# The bench's SatMAE band groups, as indices into MODEL_BANDS (B02,B03,B04,B08,B05,B06,B07,B8A,B11,B12):
# visible + NIR (B02,B03,B04,B08), red edge (B05,B06,B07,B8A), SWIR (B11,B12) (models/model_SatMAE.py:19-21).
SATMAE_CHANNEL_GROUPS: tuple[tuple[int, ...], ...] = ((0, 1, 2, 3), (4, 5, 6, 7), (8, 9))


def _sincos_1d_float32_omega(dim: int, length: int) -> np.ndarray:
    """Prithvi's 1-D table: like MAE's but with the frequencies in float32 (models/models_Prithvi.py:33)."""
    omega = np.arange(dim // 2, dtype=np.float32)
    omega /= dim / 2.0
    omega = 1.0 / 10000**omega
    angles = np.einsum("m,d->md", np.arange(length), omega)  # int64 x float32 -> float64, as the original
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_pos_embed_3d(embed_dim: int, grid_size: tuple[int, int, int], cls_token: bool = True) -> torch.Tensor:
    """Prithvi's fixed (frames, rows, cols) table, (1 + t*h*w, embed_dim) float32, CLS row 0.

    Channels: 6/16 encode the column, 6/16 the row, 4/16 the frame; tokens frame-major, then row-major
    (models/models_Prithvi.py get_3d_sincos_pos_embed). Computed with numpy as the original, so the values are
    bit-equal: the bench never loads Prithvi's pos_embed from the checkpoint, these values are what it runs with.
    """
    if embed_dim % 16:
        raise ValueError(f"embed_dim must be divisible by 16 for a 3-D sin-cos embedding, got {embed_dim}")
    frames, rows, cols = grid_size
    col_dim, row_dim, frame_dim = embed_dim // 16 * 6, embed_dim // 16 * 6, embed_dim // 16 * 4
    col = np.tile(_sincos_1d_float32_omega(col_dim, cols), (frames * rows, 1))
    row = np.tile(np.repeat(_sincos_1d_float32_omega(row_dim, rows), cols, axis=0), (frames, 1))
    frame = np.repeat(_sincos_1d_float32_omega(frame_dim, frames), rows * cols, axis=0)
    table = np.concatenate([col, row, frame], axis=1)
    if cls_token:
        table = np.concatenate([np.zeros([1, embed_dim]), table], axis=0)
    return torch.from_numpy(table).float()


class PatchEmbed3D(nn.Module):
    """Prithvi's patch embedding (models/models_Prithvi.py:86 PatchEmbed): a Conv3d over (frames, H, W).

    Single frame only (the bench's Prithvi_100M_config: num_frames 1, tubelet 1): a (B, C, H, W) image becomes
    (B, C, 1, H, W) here, as Prithvi's forward did with x[:, :, None]. Key `proj` (weight (D, C, 1, p, p)).
    """

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.grid_size = (1, img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[1] * self.grid_size[2]
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=(1, patch_size, patch_size),
                              stride=(1, patch_size, patch_size), bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x.unsqueeze(2)).flatten(2).transpose(1, 2)  # (B, C, 1, H, W) -> (B, N, D)


class PrithviViTEncoder(ViTEncoder):
    """Prithvi-100M's encoder: vit.py ViTEncoder (keys and forward) with PatchEmbed3D and the 3-D position table.

    LayerNorm eps 1e-5 (Prithvi's config passes no norm_layer: nn.LayerNorm's default).
    """

    def __init__(self, *, img_size: int = 224, patch_size: int = 16, in_chans: int = 6, embed_dim: int = 768,
                 depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0, norm_eps: float = 1e-5) -> None:
        super().__init__(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
                         depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, norm_eps=norm_eps)
        self.patch_embed = PatchEmbed3D(img_size, patch_size, in_chans, embed_dim)  # same place in the key order
        self.reset_parameters()

    def reset_parameters(self) -> None:
        super().reset_parameters()  # MAE init; the patch projection is xavier-initialised as a flat Linear
        if isinstance(self.patch_embed, PatchEmbed3D):  # not yet while ViTEncoder.__init__ runs
            with torch.no_grad():
                table = sincos_pos_embed_3d(self.embed_dim, self.patch_embed.grid_size, cls_token=True)
                self.pos_embed.copy_(table.to(self.pos_embed.device).unsqueeze(0))

    def tokens_to_map(self, tokens: torch.Tensor) -> torch.Tensor:
        return _plain_tokens_to_map(tokens, self.grid_size)


def _plain_tokens_to_map(tokens: torch.Tensor, grid_size: int) -> torch.Tensor:
    """(B, 1+N, D) -> (B, D, g, g), dropping the CLS token (the bench's ViTCNN.reshape)."""
    batch, _, dim = tokens.shape
    # A view: channels-last in memory, as the original's. Kept so, because the convolutions behind it round by the
    # layout: a contiguous copy of the same values gives outputs ~5e-8 away from the bench's, this one equal bits.
    return tokens[:, 1:, :].transpose(1, 2).reshape(batch, dim, grid_size, grid_size)


class PlainViTEncoder(ViTEncoder):
    """vit.py ViTEncoder with `tokens_to_map`: the bench's vit_cnn encoder (model_AutoEncoderViTPretrained.py:10)."""

    def tokens_to_map(self, tokens: torch.Tensor) -> torch.Tensor:
        return _plain_tokens_to_map(tokens, self.grid_size)


class GroupedChannelViTEncoder(nn.Module):
    """SatMAE's grouped-channel ViT (models/model_SatMAE.py:13 ViTGroupedChannelsEncoder).

    Each band group gets its own timm PatchEmbed; a token = a group's patch + [2-D position table (embed_dim -
    channel_embed wide) | group table (channel_embed wide)]. Tokens are group-major (G x L), then a CLS token
    WITHOUT a position term (unlike the plain MAE ViT), `depth` timm Blocks and a final LN (eps 1e-6).
    """

    def __init__(self, *, img_size: int = 96, patch_size: int = 8, in_chans: int = 10,
                 channel_groups: Sequence[Sequence[int]] = SATMAE_CHANNEL_GROUPS, channel_embed: int = 256,
                 embed_dim: int = 1024, depth: int = 24, num_heads: int = 16, mlp_ratio: float = 4.0,
                 norm_eps: float = 1e-6) -> None:
        super().__init__()
        used = sorted(i for group in channel_groups for i in group)
        if used != list(range(in_chans)):
            raise ValueError(f"channel_groups {channel_groups} must use each of the {in_chans} input bands once")
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} must be divisible by patch_size {patch_size}")
        self.in_c, self.img_size, self.patch_size = in_chans, img_size, patch_size
        self.channel_groups = tuple(tuple(group) for group in channel_groups)
        self.embed_dim, self.depth = embed_dim, depth
        self.grid_size = img_size // patch_size
        norm_layer = partial(nn.LayerNorm, eps=norm_eps)
        self.patch_embed = nn.ModuleList(PatchEmbed(img_size, patch_size, len(group), embed_dim)
                                         for group in self.channel_groups)
        self.num_patches = self.grid_size**2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches + 1, embed_dim - channel_embed),
                                      requires_grad=False)
        self.channel_embed = nn.Parameter(torch.zeros(1, len(self.channel_groups), channel_embed),
                                          requires_grad=False)
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=True,
                                          norm_layer=norm_layer) for _ in range(depth))
        self.norm = norm_layer(embed_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The original's init (model_SatMAE.py:57-83), quirks included: only the first group's patch projection
        gets the xavier init (the others keep Conv2d's default), and channel_embed stays zero (SatMAE's own code
        fills it with a 1-D sin-cos table; the bench's copy never does: it comes from the checkpoint)."""
        with torch.no_grad():
            table = sincos_pos_embed_2d(self.pos_embed.shape[-1], self.grid_size, cls_token=True)
            self.pos_embed.copy_(table.to(self.pos_embed.device).unsqueeze(0))
        weight = self.patch_embed[0].proj.weight
        nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        init_linear_and_norm_(self)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(B, C, H, W) -> (normed tokens (B, 1 + G*L, D), every block's output with the last one normed)."""
        groups = len(self.channel_groups)
        tokens = torch.stack([embed(x[:, list(group)]) for embed, group in zip(self.patch_embed, self.channel_groups)],
                             dim=1)  # (B, G, L, D)
        position = self.pos_embed[:, 1:, :].unsqueeze(1).expand(-1, groups, -1, -1)  # (1, G, L, pD)
        channel = self.channel_embed.unsqueeze(2).expand(-1, -1, self.num_patches, -1)  # (1, G, L, cD)
        tokens = (tokens + torch.cat([position, channel], dim=-1)).flatten(1, 2)  # (B, G*L, D), group-major
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), tokens], dim=1)
        return run_blocks(self.blocks, self.norm, x)

    def tokens_to_map(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, 1 + G*L, D) -> (B, G*D, g, g): each group's token map, concatenated group after group on the
        channel axis (the bench's SatMAE.reshape, model_SatMAE.py:179)."""
        batch, _, dim = tokens.shape
        grid, groups = self.grid_size, len(self.channel_groups)
        maps = tokens[:, 1:, :].reshape(batch, groups, grid, grid, dim).permute(0, 2, 3, 1, 4)
        # Channels-last memory, as the original's torch.cat of transposed views (see _plain_tokens_to_map).
        return maps.reshape(batch, grid, grid, groups * dim).permute(0, 3, 1, 2)
