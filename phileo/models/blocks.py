"""Building blocks of the Geo-Aware U-Net (the original `model/building_blocks.py`).

Attribute names follow the original module tree on purpose: state dicts of the original
`PhilEO_CNN` load into our models with `load_state_dict(strict=True)`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

ActLayer = str | Callable[[], nn.Module]

_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "gelu": nn.GELU,
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,  # the original PhilEO_CNN default
    "silu": nn.SiLU,
    "sigmoid": nn.Sigmoid,
}


def resolve_act_layer(act_layer: ActLayer) -> Callable[[], nn.Module]:
    """A factory of activation modules from a name ("gelu", ...) or a module class."""
    if isinstance(act_layer, str):
        try:
            return _ACTIVATIONS[act_layer.lower()]
        except KeyError:
            raise ValueError(f"unknown activation {act_layer!r}; known: {sorted(_ACTIVATIONS)}") from None
    if isinstance(act_layer, nn.Module):
        raise TypeError("pass an activation class or name (e.g. nn.GELU or 'gelu'), not an instance")
    return act_layer


def _trunc_normal_nonzero_(tensor: torch.Tensor, mean: float, std: float) -> None:
    """trunc_normal_ init, redrawn until no element is exactly zero (as the original does)."""
    nn.init.trunc_normal_(tensor, mean, std)
    if tensor.is_meta:  # built on the meta device (e.g. to count or shard): no values to check
        return
    while torch.any(tensor == 0):
        nn.init.trunc_normal_(tensor, mean, std)


class GaussianDropout2d(nn.Module):
    """Replace whole channels by Gaussian noise with the channel's own mean and std (training only).

    Each channel is dropped with probability `p`. With `signal_to_noise=(lo, hi)` a level s ~ U(lo, hi)
    is drawn per channel; as in the original, kept channels become `x * s` and dropped channels
    `noise * (1 - s)` (its docstring describes mixing signal into the *dropped* channels instead; we
    keep the code's behaviour so that results stay comparable). With `signal_to_noise=None` kept
    channels stay `x` and dropped channels are pure noise.
    """

    def __init__(self, p: float = 0.5, signal_to_noise: tuple[float, float] | None = (0.1, 0.9)) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"p must be in [0, 1), got {p}")  # p = 1 would redraw the mask forever
        self.p = p
        self.signal_to_noise = signal_to_noise

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        batch_size, channels, _, _ = x.shape
        keep = torch.rand(batch_size, channels, 1, 1, device=x.device) > self.p
        # Redraw while *every* channel would be dropped. The original (building_blocks.py:69) tested
        # torch.all(mask), i.e. redrew when every channel was *kept*, the opposite of its comment.
        while not torch.any(keep):
            keep = torch.rand(batch_size, channels, 1, 1, device=x.device) > self.p

        mean = x.mean(dim=(2, 3), keepdim=True).expand_as(x)
        std = x.std(dim=(2, 3), keepdim=True).clamp(min=1e-6).expand_as(x)
        noise = torch.normal(mean, std)

        # The original left `adjusted_signal` undefined when signal_to_noise is None (NameError).
        signal, noise_part = x, noise
        if self.signal_to_noise is not None:
            low, high = self.signal_to_noise
            level = torch.rand(batch_size, channels, 1, 1, device=x.device, dtype=x.dtype) * (high - low) + low
            signal, noise_part = x * level, noise * (1 - level)
        return torch.where(keep, signal, noise_part)


class ScaleSkip2D(nn.Module):
    """Learnable per-channel skip merge: `(x * sx + bx) + drop(y * sy + by)`.

    Scales start near 1 and biases near 0 (trunc-normal, std `init_std`), redrawn until no value is
    exactly zero. `drop_y > 0` applies GaussianDropout2d to the skip branch `y` during training.
    """

    def __init__(
        self,
        channels: int,
        drop_y: float | None = None,
        signal_to_noise: tuple[float, float] | None = (0.1, 0.9),
        init_std: float = 0.01,
    ) -> None:
        super().__init__()
        self.channels = channels
        self.init_std = init_std
        # Registration order = the original's, so parameters() order (and optimizer state) matches.
        self.x_skipscale = nn.Parameter(torch.ones(1, channels, 1, 1))
        self.y_skipscale = nn.Parameter(torch.ones(1, channels, 1, 1))
        self.y_skipbias = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.x_skipbias = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.drop_y = GaussianDropout2d(drop_y, signal_to_noise) if drop_y else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _trunc_normal_nonzero_(self.x_skipscale, 1.0, self.init_std)
        _trunc_normal_nonzero_(self.y_skipscale, 1.0, self.init_std)
        _trunc_normal_nonzero_(self.y_skipbias, 0.0, self.init_std)
        _trunc_normal_nonzero_(self.x_skipbias, 0.0, self.init_std)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = x * self.x_skipscale + self.x_skipbias
        y = y * self.y_skipscale + self.y_skipbias
        if self.drop_y is not None:
            y = self.drop_y(y)
        return x + y


class SE_Block(nn.Module):  # noqa: N801 - the original's class name, kept for recognisability
    """Squeeze-and-excitation: global average pool -> bottleneck MLP (GELU) -> sigmoid channel gate."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        self.reduction = reduction
        hidden = max(1, channels // reduction)
        self.squeeze = nn.AdaptiveAvgPool2d(1)
        self.excitation = nn.Sequential(
            nn.Linear(channels, hidden, bias=False),
            nn.GELU(),  # fixed GELU whatever the model's activation, as in the original
            nn.Linear(hidden, channels, bias=False),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch_size, channels, _, _ = x.shape
        gate = self.excitation(self.squeeze(x).view(batch_size, channels))
        return x * gate.view(batch_size, channels, 1, 1)


class CNNBlock(nn.Module):
    """Residual bottleneck block: 1x1 conv -> LN -> act -> 3x3 conv -> LN -> act -> 1x1 conv -> SE,
    merged with the (1x1-matched) input by a ScaleSkip2D, then `act_out`.

    The norms are LayerNorms over the whole (C, H, W) feature map, so a block only accepts inputs of
    `spatial_size` and carries 2*C*H*W affine parameters per norm (55% of the 44M model).
    """

    def __init__(
        self,
        channels_in: int,
        channels_out: int | None = None,
        *,
        spatial_size: int,
        groups: int = 1,
        act_layer: ActLayer = "gelu",
        act_out_layer: ActLayer | None = None,
        residual: bool = True,
        reduction: int = 1,
    ) -> None:
        super().__init__()
        self.channels_in = channels_in
        self.channels_out = channels_in if channels_out is None else channels_out
        self.residual = residual
        internal = self.channels_out // reduction
        norm_shape = [internal, spatial_size, spatial_size]
        make_act = resolve_act_layer(act_layer)

        self.squeeze = SE_Block(self.channels_out, 16)
        # The original also built the matcher for residual=False, where it is never used (no gradient).
        needs_matcher = residual and channels_in != self.channels_out
        self.matcher = nn.Conv2d(channels_in, self.channels_out, 1, bias=False) if needs_matcher else None
        self.norm1 = nn.LayerNorm(norm_shape)
        self.norm2 = nn.LayerNorm(norm_shape)
        self.conv1 = nn.Conv2d(channels_in, internal, 1, bias=False)
        self.conv2 = nn.Conv2d(internal, internal, 3, padding=1, groups=groups, bias=False, padding_mode="replicate")
        self.conv3 = nn.Conv2d(internal, self.channels_out, 1, bias=True)
        self.scaler = ScaleSkip2D(self.channels_out) if residual else None
        self.activation = make_act()
        self.activation_out = resolve_act_layer(act_out_layer)() if act_out_layer is not None else make_act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.matcher is None else self.matcher(x)
        x = self.activation(self.norm1(self.conv1(x)))
        x = self.activation(self.norm2(self.conv2(x)))
        x = self.squeeze(self.conv3(x))
        if self.scaler is not None:
            x = self.scaler(x, identity)
        return self.activation_out(x)
