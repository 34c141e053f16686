"""ResNet-50 encoders with the bench's core CNN decoder: ImageNet ResNet-50 (models/model_Resnet50.py) and
Seasonal Contrast (SeCo, models/model_Seco.py); registered as resnet50[-classifier] and seco-resnet50[-classifier].

Both originals take the 10 PhilEO Bench bands / 10000 at 224 px and keep only RGB inside forward
(`x[:, (2, 1, 0)]`, model_Resnet50.py:44, model_Seco.py:38): here `input_spec` selects B04, B03, B02 and the
model receives 3 channels, reflectance scaled (no ImageNet or SeCo mean/std normalisation: the bench used none).

The encoder is torchvision's ResNet-50 without avgpool and fc, as an nn.Sequential under `encoder`
(keys encoder.0 = conv1, encoder.1 = bn1, encoder.4-7 = layer1-4). Dense models: encoder (B, 2048, h/32, w/32)
-> decoder_upsample_block (a DecoderBlock 2048 -> 2048, 2x up) -> decoder_head (CoreDecoder nano, 16x up).
Weights are never downloaded: `--init` files are mapped by `pretrained_key_map` (torchvision / timm names,
or SeCo's lightning `encoder_q.*`).

Quirk not kept by default: the original `resnet()` builder freezes the encoder even with random weights
(model_Resnet50.py:70,80: freeze_body defaults to True and the bench never passes it), so the bench's "resnet"
baseline trained only its decoder. Here a ResNet trains its encoder unless frozen mode is asked for;
`freeze_encoder_always=True` (a factory override) reproduces the original.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from .core_cnn import CORE_NANO_DECODER_DEPTHS, CORE_NANO_DECODER_DIMS, CoreDecoder, DecoderBlock
from .downstream import DownstreamCNN
from .inputs import InputSpec

RGB_BANDS: tuple[str, ...] = ("B04", "B03", "B02")
RESNET_INPUT = InputSpec(bands=RGB_BANDS, img_size=224)
# torchvision (and timm) ResNet names -> our nn.Sequential(children[:-2]) names.
TORCHVISION_KEY_MAP: dict[str, str] = {
    "conv1.": "encoder.0.", "bn1.": "encoder.1.", "layer1.": "encoder.4.", "layer2.": "encoder.5.",
    "layer3.": "encoder.6.", "layer4.": "encoder.7.",
}
# SeCo's published file is a pytorch-lightning MocoV2 checkpoint; its query encoder is the one the bench keeps
# (models/model_Seco.py:13 `deepcopy(model.encoder_q)`), the momentum encoder_k.* and heads are not loaded.
SECO_KEY_MAP: dict[str, str] = {"encoder_q.": "encoder."}
# Bodies: ResNet-50 (Bottleneck [3, 4, 6, 3], 2048 channels out) and a tiny test body (BasicBlock [1]*4, 512).
BODIES: dict[str, tuple[type[nn.Module], list[int], int]] = {
    "resnet50": (Bottleneck, [3, 4, 6, 3], 2048),
    "tiny": (BasicBlock, [1, 1, 1, 1], 512),
}


def resnet_body(body: str, keep_avgpool: bool = False) -> tuple[nn.Sequential, int]:
    """torchvision ResNet children without fc (and without avgpool unless asked), and its output channels."""
    try:
        block, layers, channels = BODIES[body]
    except KeyError:
        raise ValueError(f"unknown ResNet body {body!r}; known: {sorted(BODIES)}") from None
    children = list(ResNet(block, layers).children())
    return nn.Sequential(*children[:-1 if keep_avgpool else -2]), channels


class _ResNetModel(DownstreamCNN):
    def _finish(self, output_dim: int, key_map: dict[str, str], img_size: int, freeze_encoder_always: bool) -> None:
        self._declare(InputSpec(bands=RGB_BANDS, img_size=img_size), output_dim, encoder_prefixes=("encoder.",),
                      pretrained_key_map=key_map)
        if freeze_encoder_always:  # the original resnet() builder's behaviour (see the module docstring)
            self.freeze_encoder()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x, 32)
        return self.encoder(x)


class ResNetDecoder(_ResNetModel):
    """Resnet50 / Seco of the bench: ResNet encoder + DecoderBlock upsampling + CoreDecoder, (B, K, H, W)."""

    def __init__(self, output_dim: int = 1, *, body: str = "resnet50", key_map: dict[str, str] | None = None,
                 decoder_depths: Sequence[int] = CORE_NANO_DECODER_DEPTHS,
                 decoder_dims: Sequence[int] = CORE_NANO_DECODER_DIMS, decoder_norm: str = "batch",
                 decoder_activation: str = "relu", decoder_padding: str = "same", img_size: int = 224,
                 freeze_encoder_always: bool = False) -> None:
        super().__init__()
        self.encoder, channels = resnet_body(body)
        self.depths, self.dims, self.output_dim = list(decoder_depths), list(decoder_dims), output_dim
        block = {"norm": decoder_norm, "activation": decoder_activation, "padding": decoder_padding}
        self.decoder_head = CoreDecoder(embedding_dim=channels, output_dim=output_dim, depths=self.depths,
                                        dims=self.dims, **block)
        self.decoder_upsample_block = nn.Sequential(
            DecoderBlock(depth=1, in_channels=channels, out_channels=channels, **block))
        self._finish(output_dim, TORCHVISION_KEY_MAP if key_map is None else key_map, img_size,
                     freeze_encoder_always)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder_head(self.decoder_upsample_block(self.forward_features(x)))


class ResNetClassifier(_ResNetModel):
    """Resnet50_Classifier of the bench: encoder with its avgpool, then Flatten + Linear: (B, K) logits."""

    per_patch_output = True  # (B, output_dim) logits: built for the classification tasks

    def __init__(self, output_dim: int = 1, *, body: str = "resnet50", img_size: int = 224,
                 freeze_encoder_always: bool = False) -> None:
        super().__init__()
        self.encoder, channels = resnet_body(body, keep_avgpool=True)
        self.classification_head = nn.Sequential(nn.Flatten(start_dim=1, end_dim=-1), nn.Linear(channels, output_dim))
        self._finish(output_dim, TORCHVISION_KEY_MAP, img_size, freeze_encoder_always)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classification_head(self.forward_features(x))


class SecoClassifier(_ResNetModel):
    """Seco_Classifier of the bench: encoder, then pool + Linear(2048, 2048) + ReLU + Linear: (B, K) logits."""

    per_patch_output = True  # (B, output_dim) logits: built for the classification tasks

    def __init__(self, output_dim: int = 1, *, body: str = "resnet50", img_size: int = 224,
                 freeze_encoder_always: bool = False) -> None:
        super().__init__()
        self.encoder, channels = resnet_body(body)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(output_size=(1, 1)), nn.Flatten(start_dim=1, end_dim=-1),
                                  nn.Linear(channels, channels), nn.ReLU(), nn.Linear(channels, output_dim))
        self._finish(output_dim, SECO_KEY_MAP, img_size, freeze_encoder_always)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))
