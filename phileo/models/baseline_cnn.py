"""The bench's plain CNN baseline (models/model_Baseline.py BaselineNet), registered as baseline-cnn.

Six full-resolution convolutions (5x5, 5x5, 3x3, 3x3, 1x1, 1x1) at width 256 with three norm+activation
steps, then a 1x1 conv to output_dim: no downsampling, no skips. It has no pretrained weights; its "encoder"
(what frozen mode freezes, what `encode` pools) is everything before the last 1x1 conv.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .core_cnn import ActivationSpec, get_activation, get_normalization
from .downstream import DownstreamCNN
from .inputs import InputSpec


class BaselineNet(DownstreamCNN):
    def __init__(self, *, input_dim: int = 10, output_dim: int = 1, activation: ActivationSpec = "relu",
                 norm: str = "batch", padding: str | int = "same", width: int = 256, img_size: int = 128) -> None:
        super().__init__()
        self.output_dim, self.input_dim, self.norm, self.padding = output_dim, input_dim, norm, padding
        self.activation = get_activation(activation)  # one module, used three times (as the original)
        self.size = width  # 256 in the original, fixed there
        layers: list[nn.Module] = []
        for kernel, in_channels in ((5, input_dim), (3, width), (1, width)):
            layers += [nn.Conv2d(in_channels, width, kernel_size=kernel, padding=padding),
                       nn.Conv2d(width, width, kernel_size=kernel, padding=padding),
                       get_normalization(norm, width), self.activation]
        layers.append(nn.Conv2d(width, output_dim, kernel_size=1, padding=padding))
        self.net = nn.Sequential(*layers)
        encoder = tuple(f"net.{i}." for i in range(len(layers) - 1))
        self._declare(InputSpec(img_size=img_size), output_dim, encoder_prefixes=encoder)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x, 1)
        return self.net[:-1](x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[-1](self.forward_features(x))
