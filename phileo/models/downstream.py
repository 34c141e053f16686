"""What the PhilEO Bench CNN zoo models share: the downstream-model contract of phileo/models.

A downstream model is built whole by its factory (`is_downstream = True`), says what it eats (`input_spec`,
`in_chans`, `img_size`) and what it outputs (`out_chans`), which state-dict prefixes are its pretrained
encoder (`encoder_prefixes`: what `--mode frozen` freezes), which keys a published checkpoint may fill
(`pretrained_prefixes`) and how a published file's names map onto its own (`pretrained_key_map`, used by
task_heads.load_encoder). `encode(x)` is one vector per image: the global average pool of the deepest
encoder feature map (`forward_features`).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn as nn

from .inputs import InputSpec


class DownstreamCNN(nn.Module):
    """Base of the zoo's CNN models. Subclasses call `_declare(...)` in __init__ and define forward_features."""

    is_downstream = True
    per_patch_output = False  # True: (B, output_dim) logits, a classifier

    def _declare(self, spec: InputSpec, out_chans: int, encoder_prefixes: tuple[str, ...],
                 pretrained_prefixes: tuple[str, ...] | None = None,
                 pretrained_key_map: dict[str, str] | None = None) -> None:
        self.input_spec = spec
        self.in_chans, self.img_size, self.out_chans = spec.in_chans, spec.img_size, out_chans
        self.encoder_prefixes = encoder_prefixes
        self.pretrained_prefixes = pretrained_prefixes if pretrained_prefixes is not None else encoder_prefixes
        self.pretrained_key_map = dict(pretrained_key_map or {})

    def encoder_parameters(self) -> Iterator[nn.Parameter]:
        """Exactly the parameters under `encoder_prefixes` (what freeze_encoder freezes)."""
        for name, param in self.named_parameters():
            if name.startswith(self.encoder_prefixes):
                yield param

    def freeze_encoder(self) -> None:
        for param in self.encoder_parameters():
            param.requires_grad_(False)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D): global average pool of the deepest encoder feature map."""
        return self.forward_features(x).mean(dim=(-2, -1))

    def check_input(self, x: torch.Tensor, multiple: int) -> None:
        """One-line error for input the network cannot take: wrong band count, or a size it cannot halve."""
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"{type(self).__name__}: expected input (B, {self.in_chans}, H, W) "
                             f"(bands {','.join(self.input_spec.bands)}), got {tuple(x.shape)}")
        if x.shape[-1] % multiple or x.shape[-2] % multiple:
            raise ValueError(f"{type(self).__name__}: height and width must be multiples of {multiple}, "
                             f"got {tuple(x.shape[-2:])}")
