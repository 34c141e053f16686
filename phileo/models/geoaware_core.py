"""The bench's GeoAware CoreCNN models: CoreUnet / CoreEncoder nano initialised from the GeoAware pretraining
checkpoint (models/model_GeoAwarePretrained.py CoreEncoderGeoPretrained, model_GeoAwarePretrained_classifier.py
CoreEncoderGeoPretrained_Classifier); registered as geoaware-core-nano and geoaware-core-nano-classifier.

The published checkpoint ("CoreEncoder_last_8.pt", pb/resources_paths.py:43) is a CoreEncoder-nano state dict:
`stem.*` (a bare CoreCNNBlock), `encoder_blocks.*` and a pretraining `head.*`.
* The classifier loads it by name, head dropped (model_GeoAwarePretrained_classifier.py:19-26).
* The U-Net pairs checkpoint keys with its own keys BY POSITION, skipping `head.*`
  (model_GeoAwarePretrained.py:66 `zip(checkpoint.keys(), model_sd.keys())`); the CoreEncoder's stem and
  encoder come first in both, so `stem.X` lands in `stem.0.X` and `encoder_blocks.*` in itself. We load by
  name with the same result (`pretrained_key_map`), so a file whose keys are in another order loads too
  instead of being silently misassigned. A CoreUnet-format file (`stem.0.*`, `decoder_blocks.*`, `bridge.*`)
  also fills the decoder, as the positional pairing would.
Both originals freeze exactly what they loaded from a CoreEncoder file (stem + encoder), = our encoder.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .core_unet import CORE_NANO_DEPTHS, CORE_NANO_DIMS, CoreEncoder, CoreUnet
from .downstream import DownstreamCNN

# checkpoint-key prefix -> model-key prefix; the first whose target exists wins ("stem.0." before "stem.").
UNET_KEY_MAP: dict[str, str] = {
    "stem.0.": "coreunet.stem.0.", "stem.": "coreunet.stem.0.", "encoder_blocks.": "coreunet.encoder_blocks.",
    "decoder_blocks.": "coreunet.decoder_blocks.", "bridge.": "coreunet.bridge.",
}
CLASSIFIER_KEY_MAP: dict[str, str] = {
    "stem.0.": "model.stem.", "stem.": "model.stem.", "encoder_blocks.": "model.encoder_blocks.",
}


class GeoAwareCoreUnet(DownstreamCNN):
    """CoreUnet under `coreunet` (the original's attribute, so its fine-tuned state dicts load by name)."""

    def __init__(self, output_dim: int = 1, depths: Sequence[int] = CORE_NANO_DEPTHS,
                 dims: Sequence[int] = CORE_NANO_DIMS, img_size: int = 128) -> None:
        super().__init__()
        # get_core_encoder_kwargs(full_unet=True) doubles the dims, which CoreUnet halves again.
        self.coreunet = CoreUnet(input_dim=10, output_dim=output_dim, depths=depths, dims=[2 * d for d in dims],
                                 img_size=img_size)
        self._declare(self.coreunet.input_spec, output_dim,
                      encoder_prefixes=("coreunet.stem.", "coreunet.encoder_blocks."),
                      pretrained_prefixes=("coreunet.stem.", "coreunet.encoder_blocks.", "coreunet.decoder_blocks.",
                                           "coreunet.bridge."),
                      pretrained_key_map=UNET_KEY_MAP)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.coreunet.forward_features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.coreunet(x)


class GeoAwareCoreClassifier(DownstreamCNN):
    """CoreEncoder under `model` (the original's attribute): (B, output_dim) logits."""

    per_patch_output = True  # (B, output_dim) logits: built for the classification tasks

    def __init__(self, output_dim: int = 1, depths: Sequence[int] = CORE_NANO_DEPTHS,
                 dims: Sequence[int] = CORE_NANO_DIMS, img_size: int = 128) -> None:
        super().__init__()
        self.model = CoreEncoder(input_dim=10, output_dim=output_dim, depths=depths, dims=dims, img_size=img_size)
        self._declare(self.model.input_spec, output_dim, encoder_prefixes=("model.stem.", "model.encoder_blocks."),
                      pretrained_key_map=CLASSIFIER_KEY_MAP)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)
