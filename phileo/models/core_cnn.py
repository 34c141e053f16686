"""The PhilEO Bench core CNN pieces that several bench models share (the bench's models/model_CoreCNN.py,
models/model_DecoderUtils.py and utils/training_utils.py).

`CoreCNNBlock` is the bench's residual block, `EncoderBlock` / `DecoderBlock` stack it with a 2x max-pool /
bilinear 2x upsampling, and `CoreDecoder` is the "core nano" CNN decoder that the bench puts behind every
foreign encoder (ResNet-50, SeCo, SatMAE, Prithvi, ViTs): `CoreDecoder(embedding_dim=D, output_dim=K,
depths=[2, 2, 8, 2], dims=[80, 160, 320, 640])` turns a (B, D, h, w) feature map into (B, K, 16h, 16w).

Module and attribute names are the original's on purpose: state dicts of the bench models load into ours by
name. Two quirks of the original are kept, because the published weights were trained with them:
* activation "relu" is ReLU6 (utils/training_utils.py:285 `get_activation`);
* `CoreCNNBlock` computes `x * self.squeeze(x)` although the SE block already returns `x * gate`
  (utils/training_utils.py:202), so the block scales by x^2 * gate, not x * gate (models/model_CoreCNN.py:40).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn as nn

ActivationSpec = str | nn.Module

_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    # Quirk kept: the bench's "relu" is ReLU6 (utils/training_utils.py:285).
    "relu": lambda: nn.ReLU6(inplace=False),
    "gelu": nn.GELU,
    "leaky_relu": lambda: nn.LeakyReLU(inplace=True),
    "prelu": nn.PReLU,
    "selu": lambda: nn.SELU(inplace=True),
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "mish": nn.Mish,
}


def get_activation(activation: ActivationSpec) -> nn.Module:
    """An activation module from the bench's name ("relu" gives ReLU6), or the module itself (as the bench)."""
    if isinstance(activation, nn.Module):
        return activation
    try:
        return _ACTIVATIONS[activation]()
    except KeyError:
        raise ValueError(f"unknown activation {activation!r}; known: {sorted(_ACTIVATIONS)}") from None


def get_normalization(norm: str, channels: int, num_groups: int = 32) -> nn.Module:
    """A 2-D normalisation layer by the bench's name (utils/training_utils.py get_normalization, dims=2)."""
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "instance":
        return nn.InstanceNorm2d(channels)
    if norm == "layer":
        return nn.LayerNorm(channels)
    if norm == "group":
        return nn.GroupNorm(num_groups=num_groups, num_channels=channels)
    if norm == "bcn":
        return nn.Sequential(nn.BatchNorm2d(channels), nn.GroupNorm(1, channels))
    if norm == "none":
        return nn.Identity()
    raise ValueError(f"unknown normalization {norm!r}; known: batch, instance, layer, group, bcn, none")


class SEBlock(nn.Module):
    """Squeeze-and-excitation (the bench's SE_Block): returns x * gate, gate = sigmoid(MLP(mean over H, W))."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        self.reduction = reduction
        self.squeeze = nn.AdaptiveAvgPool2d(1)
        self.excitation = nn.Sequential(
            nn.Linear(channels, channels // reduction, bias=False),
            nn.ReLU(inplace=True),  # a plain ReLU here, as the original (not get_activation's ReLU6)
            nn.Linear(channels // reduction, channels, bias=False),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        gate = self.excitation(self.squeeze(x).view(b, c)).view(b, c, 1, 1)
        return x * gate.expand_as(x)


class CoreCNNBlock(nn.Module):
    """1x1 conv -> depthwise 3x3 -> 3x3 conv, each normalised, SE-scaled, plus a (1x1-matched) residual."""

    def __init__(self, in_channels: int, out_channels: int, *, norm: str = "batch",
                 activation: ActivationSpec = "relu", padding: str | int = "same", residual: bool = True) -> None:
        super().__init__()
        self.activation = get_activation(activation)
        self.residual = residual
        self.padding = padding
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.squeeze = SEBlock(out_channels)

        self.match_channels: nn.Module = nn.Identity()
        if in_channels != out_channels:
            self.match_channels = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, kernel_size=1, padding=0, bias=False),
                get_normalization(norm, out_channels),
            )
        self.conv1 = nn.Conv2d(in_channels, out_channels, 1, padding=0)
        self.norm1 = get_normalization(norm, out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=padding, groups=out_channels)
        self.norm2 = get_normalization(norm, out_channels)
        self.conv3 = nn.Conv2d(out_channels, out_channels, 3, padding=padding, groups=1)
        self.norm3 = get_normalization(norm, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        x = self.activation(self.norm1(self.conv1(x)))
        x = self.activation(self.norm2(self.conv2(x)))
        x = self.norm3(self.conv3(x))
        # Quirk kept (models/model_CoreCNN.py:40): SEBlock already returns x * gate, so this is x^2 * gate.
        # The published bench weights were trained with it; "fixing" it would change what they compute.
        x = x * self.squeeze(x)
        if self.residual:
            x = x + self.match_channels(identity)
        return self.activation(x)


def _block_stack(depth: int, in_channels: int, out_channels: int, norm: str, activation: ActivationSpec,
                 padding: str | int) -> nn.Sequential:
    """`depth` CoreCNNBlocks, the first taking in_channels."""
    return nn.Sequential(*(
        CoreCNNBlock(in_channels if i == 0 else out_channels, out_channels, norm=norm, activation=activation,
                     padding=padding)
        for i in range(depth)
    ))


class EncoderBlock(nn.Module):
    """`depth` CoreCNNBlocks then a 2x max-pool (models/model_DecoderUtils.py EncoderBlock)."""

    def __init__(self, depth: int, in_channels: int, out_channels: int, norm: str = "batch",
                 activation: ActivationSpec = "relu", padding: str | int = "same") -> None:
        super().__init__()
        self.depth, self.in_channels, self.out_channels = depth, in_channels, out_channels
        self.blocks = _block_stack(depth, in_channels, out_channels, norm, activation, padding)
        self.downsample = nn.MaxPool2d(kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.downsample(self.blocks(x))


class DecoderBlock(nn.Module):
    """Bilinear 2x upsampling, a channel-matching CoreCNNBlock, then `depth` CoreCNNBlocks (no skips)."""

    def __init__(self, depth: int, in_channels: int, out_channels: int, *, norm: str = "batch",
                 activation: ActivationSpec = "relu", padding: str | int = "same") -> None:
        super().__init__()
        self.depth, self.in_channels, self.out_channels = depth, in_channels, out_channels
        self.upsample = nn.UpsamplingBilinear2d(scale_factor=2)
        self.match_channels = CoreCNNBlock(in_channels, out_channels, norm=norm, activation=activation,
                                           padding=padding)
        self.blocks = _block_stack(depth, out_channels, out_channels, norm, activation, padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.match_channels(self.upsample(x)))


class CoreDecoder(nn.Module):
    """The bench's CNN decoder behind a foreign encoder (models/model_DecoderUtils.py CoreDecoder).

    decoder_bridge (embedding_dim -> dims[-1]) -> one DecoderBlock per stage, deepest first, each 2x up ->
    decoder_head (CoreCNNBlock + 1x1 conv to output_dim, raw values). Output: 2**len(dims) x the input size.
    """

    def __init__(self, *, embedding_dim: int = 10, output_dim: int = 1, depths: Sequence[int] | None = None,
                 dims: Sequence[int] | None = None, activation: ActivationSpec = "relu", norm: str = "batch",
                 padding: str | int = "same") -> None:
        super().__init__()
        self.depths = list(depths) if depths is not None else [3, 3, 9, 3]
        self.dims = list(dims) if dims is not None else [96, 192, 384, 768]
        if len(self.depths) != len(self.dims):
            raise ValueError(f"depths {self.depths} and dims {self.dims} must have the same length")
        self.output_dim = output_dim
        self.embedding_dim = embedding_dim
        self.decoder_blocks = nn.ModuleList(
            DecoderBlock(self.depths[i], self.dims[i], self.dims[i - 1] if i > 0 else self.dims[0],
                         norm=norm, activation=activation, padding=padding)
            for i in reversed(range(len(self.depths)))
        )
        self.decoder_downsample_block = nn.Identity()
        self.decoder_bridge = nn.Sequential(
            CoreCNNBlock(embedding_dim, self.dims[-1], norm=norm, activation=activation, padding=padding),
        )
        self.decoder_head = nn.Sequential(
            CoreCNNBlock(self.dims[0], self.dims[0], norm=norm, activation=activation, padding=padding),
            nn.Conv2d(self.dims[0], output_dim, kernel_size=1, padding=0),
        )

    def forward_decoder(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.decoder_blocks:
            x = block(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder_head(self.forward_decoder(self.decoder_bridge(x)))


# The bench's "core nano" decoder configuration (models/model_AutoEncoderViTPretrained.py get_core_decoder_kwargs,
# core_size="core_nano"), used behind ResNet-50, SeCo, SatMAE, Prithvi and the PhilEO ViTs.
CORE_NANO_DECODER_DEPTHS: tuple[int, ...] = (2, 2, 8, 2)
CORE_NANO_DECODER_DIMS: tuple[int, ...] = (80, 160, 320, 640)
