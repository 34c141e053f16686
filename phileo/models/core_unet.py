"""The PhilEO Bench's own CNNs: CoreUnet (U-Net with attention skips) and CoreEncoder (encoder + linear
classifier), from the bench's models/model_CoreCNN.py; registered as core-unet-nano and core-encoder-nano.

Module names are the original's (state dicts load by name). Like the original, CoreUnet halves the `dims` it
is given (models/model_CoreCNN.py:186): CoreUnet_nano passes [160, 320, 640, 1280] and runs at
[80, 160, 320, 640], the widths of CoreEncoder nano, so a CoreEncoder checkpoint fits its stem and encoder.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from .core_cnn import ActivationSpec, CoreCNNBlock, EncoderBlock, _block_stack, get_activation, get_normalization
from .downstream import DownstreamCNN
from .inputs import InputSpec

CORE_NANO_DEPTHS: tuple[int, ...] = (2, 2, 8, 2)
CORE_NANO_DIMS: tuple[int, ...] = (80, 160, 320, 640)  # CoreEncoder nano; CoreUnet nano is given 2x these
# The CoreUnet keys a CoreEncoder checkpoint's keys become: its stem is a bare block, CoreUnet's a Sequential.
CORE_ENCODER_TO_UNET: dict[str, str] = {"stem.": "stem.0."}


class CoreEncoderBlock(EncoderBlock):
    """EncoderBlock (same modules and keys) that also returns the map before pooling, for the U-Net skips."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        before_downsample = self.blocks(x)
        return self.downsample(before_downsample), before_downsample


class CoreAttentionBlock(nn.Module):
    """Spatial (1x1 conv) and channel (pooled MLP) sigmoid attention on the sum of the upsampled map and skip."""

    def __init__(self, lower_channels: int, higher_channels: int, *, norm: str = "batch",
                 activation: ActivationSpec = "relu", padding: str | int = "same") -> None:
        super().__init__()
        self.lower_channels, self.higher_channels = lower_channels, higher_channels
        self.activation = get_activation(activation)
        self.expansion, self.reduction = 4, 4
        if lower_channels != higher_channels:
            self.match = nn.Sequential(
                nn.Conv2d(higher_channels, lower_channels, kernel_size=1, padding=0, bias=False),
                get_normalization(norm, lower_channels),
            )
        self.compress = nn.Conv2d(lower_channels, 1, kernel_size=1, padding=0)
        self.sigmoid = nn.Sigmoid()
        self.attn_c_pool = nn.AdaptiveAvgPool2d(self.reduction)
        self.attn_c_reduction = nn.Linear(lower_channels * self.reduction ** 2, lower_channels * self.expansion)
        self.attn_c_extention = nn.Linear(lower_channels * self.expansion, lower_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.size(1) != skip.size(1):
            x = self.match(x)
        x = self.activation(x + skip)
        attn_spatial = self.sigmoid(self.compress(x))
        attn_channel = self.attn_c_pool(x).reshape(x.size(0), -1)
        attn_channel = self.attn_c_extention(self.activation(self.attn_c_reduction(attn_channel)))
        attn_channel = self.sigmoid(attn_channel.reshape(x.size(0), x.size(1), 1, 1))
        return attn_spatial, attn_channel


class CoreDecoderBlock(nn.Module):
    """2x up, attention-weighted skip concatenated, a channel-matching CoreCNNBlock, `depth` CoreCNNBlocks."""

    def __init__(self, depth: int, in_channels: int, out_channels: int, *, norm: str = "batch",
                 activation: ActivationSpec = "relu", padding: str | int = "same") -> None:
        super().__init__()
        self.depth, self.in_channels, self.out_channels = depth, in_channels, out_channels
        self.upsample = nn.UpsamplingBilinear2d(scale_factor=2)
        self.match_channels = CoreCNNBlock(in_channels * 2, out_channels, norm=norm, activation=activation,
                                           padding=padding)
        self.attention = CoreAttentionBlock(in_channels, in_channels, norm=norm, activation=activation,
                                            padding=padding)
        self.blocks = _block_stack(depth, out_channels, out_channels, norm, activation, padding)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.upsample(x)
        attn_s, attn_c = self.attention(x, skip)
        # As the original (models/model_CoreCNN.py:157): the channel attention is added, not multiplied.
        x = torch.cat([x, (skip * attn_s) + (skip + attn_c)], dim=1)
        return self.blocks(self.match_channels(x))


def _encoder_blocks(depths: Sequence[int], dims: Sequence[int], norm: str, activation: ActivationSpec,
                    padding: str | int) -> nn.ModuleList:
    return nn.ModuleList(
        CoreEncoderBlock(depths[i], dims[i - 1] if i > 0 else dims[0], dims[i], norm=norm, activation=activation,
                         padding=padding)
        for i in range(len(depths))
    )


class CoreUnet(DownstreamCNN):
    """The bench's CoreUnet: stem -> encoder stages (skips) -> bridge -> attention decoder -> head (raw values).

    Encoder (what frozen mode freezes) = stem + encoder_blocks. A checkpoint may also fill the decoder and
    bridge (a CoreUnet file); a CoreEncoder file fills the encoder only (its "stem." becomes "stem.0.").
    """

    def __init__(self, *, input_dim: int = 10, output_dim: int = 1, depths: Sequence[int] | None = None,
                 dims: Sequence[int] | None = None, activation: ActivationSpec = "relu", norm: str = "batch",
                 padding: str | int = "same", img_size: int = 128) -> None:
        super().__init__()
        self.depths = list(depths) if depths is not None else [3, 3, 9, 3]
        self.dims = [v // 2 for v in (dims if dims is not None else [96, 192, 384, 768])]
        if len(self.depths) != len(self.dims):
            raise ValueError(f"depths {self.depths} and dims {self.dims} must have the same length")
        self.output_dim, self.input_dim = output_dim, input_dim
        block = {"norm": norm, "activation": activation, "padding": padding}
        self.stem = nn.Sequential(CoreCNNBlock(input_dim, self.dims[0], **block))
        self.encoder_blocks = _encoder_blocks(self.depths, self.dims, norm, activation, padding)
        self.decoder_blocks = nn.ModuleList(
            CoreDecoderBlock(self.depths[i], self.dims[i], self.dims[i - 1] if i > 0 else self.dims[0], **block)
            for i in reversed(range(len(self.depths)))
        )
        self.bridge = nn.Sequential(CoreCNNBlock(self.dims[-1], self.dims[-1], **block))
        self.head = nn.Sequential(
            CoreCNNBlock(self.dims[0], self.dims[0], **block),
            nn.Conv2d(self.dims[0], output_dim, kernel_size=1, padding=0),
        )
        self._declare(InputSpec(img_size=img_size), output_dim, encoder_prefixes=("stem.", "encoder_blocks."),
                      pretrained_prefixes=("stem.", "encoder_blocks.", "decoder_blocks.", "bridge."),
                      pretrained_key_map=CORE_ENCODER_TO_UNET)

    def forward_encoder(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The deepest (pooled) encoder map and the skips, shallowest first."""
        self.check_input(x, 2 ** len(self.depths))
        skips = []
        x = self.stem(x)
        for block in self.encoder_blocks:
            x, skip = block(x)
            skips.append(skip)
        return x, skips

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_encoder(x)[0]

    def forward_body(self, x: torch.Tensor) -> torch.Tensor:
        x, skips = self.forward_encoder(x)
        x = self.bridge(x)
        for block in self.decoder_blocks:
            x = block(x, skips.pop())
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_body(x))


class CoreEncoder(DownstreamCNN):
    """The bench's CoreEncoder (core_encoder_nano, its encoder-only classifier baseline): stem -> encoder
    stages -> global average pool -> Linear: (B, output_dim) logits. Encoder = stem + encoder_blocks."""

    per_patch_output = True  # (B, output_dim) logits: built for the classification tasks

    def __init__(self, *, input_dim: int = 10, output_dim: int = 1, depths: Sequence[int] | None = None,
                 dims: Sequence[int] | None = None, activation: ActivationSpec = "relu", norm: str = "batch",
                 padding: str | int = "same", img_size: int = 128) -> None:
        super().__init__()
        self.depths = list(depths) if depths is not None else [3, 3, 9, 3]
        self.dims = list(dims) if dims is not None else [96, 192, 384, 768]
        if len(self.depths) != len(self.dims):
            raise ValueError(f"depths {self.depths} and dims {self.dims} must have the same length")
        self.output_dim, self.input_dim = output_dim, input_dim
        self.stem = CoreCNNBlock(input_dim, self.dims[0], norm=norm, activation=activation, padding=padding)
        self.encoder_blocks = _encoder_blocks(self.depths, self.dims, norm, activation, padding)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten(), nn.Linear(self.dims[-1], output_dim))
        self._declare(InputSpec(img_size=img_size), output_dim, encoder_prefixes=("stem.", "encoder_blocks."),
                      pretrained_key_map={"stem.0.": "stem."})  # a CoreUnet file's stem

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x, 2 ** len(self.depths))
        x = self.stem(x)
        for block in self.encoder_blocks:
            x, _ = block(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))
