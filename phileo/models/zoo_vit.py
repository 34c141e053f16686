"""The ViT half of the PhilEO Bench model zoo: pretrained ViT encoders + the bench's CNN decoder or classifier head.

    build("prithvi-100m", output_dim=11)          # (B, 6, 224, 224) -> (B, 11, 224, 224)
    build("satmae-classifier", output_dim=11)     # (B, 10, 96, 96) -> (B, 11) logits from the CLS token

| registry name               | original (91097luke/phileo-bench, training_script.py get_models_pretrained) |
| prithvi-100m(-classifier)   | models/models_Prithvi.py prithvi(classifier=False/True): Prithvi, PrithviClassifier |
| satmae(-classifier)         | models/model_SatMAE.py satmae_vit_cnn(img_size=96, patch_size=8, in_chans=10)       |
| vit-cnn(-classifier)        | models/model_AutoEncoderViTPretrained(_classifier).py vit_cnn(_classifier)          |
| vit-cnn-gc(-classifier)     | models/model_AutoEncoderViTPretrained(_classifier).py vit_cnn_gc(_classifier)       |

Dense models: `vit_encoder` -> patch tokens as a map (`tokens_to_map`) -> `decoder_downsample_block` (0-2 bench
EncoderBlocks, 2x max-pool each) -> `decoder_head` (the bench's "core nano" CoreDecoder, 16x up). Classifiers:
`vit_encoder` -> CLS token -> `classification_head` (Linear D->D/2, LayerNorm, ReLU, Linear). Key names and
parameter counts are the originals'. A published checkpoint (flat MAE / SatMAE / Prithvi keys: `patch_embed.*`,
`blocks.*`, ...) loads onto `vit_encoder.` through `pretrained_key_map`; its decoder_*/mask_token keys are left out.

The position tables are never trained, in frozen and full mode alike: pos_embed (and SatMAE's channel_embed) are
fixed sin-cos Parameters with requires_grad=False in the originals (MAE's design), and stay so here.
Prithvi's pos_embed is not loaded either: the bench deletes it from the checkpoint (models/models_Prithvi.py:312;
the published table is for 3 frames) and keeps the 1-frame table of its init, so it is outside this model's
encoder_prefixes (a checkpoint need not hold it) and comes from `sincos_pos_embed_3d`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn as nn

from phileo.bands import MODEL_BANDS

from .core_cnn import CORE_NANO_DECODER_DEPTHS, CORE_NANO_DECODER_DIMS, CoreDecoder, EncoderBlock
from .inputs import InputSpec
from .vit import check_input
from .zoo_vit_encoders import GroupedChannelViTEncoder, PlainViTEncoder, PrithviViTEncoder

ZooViTEncoder = PlainViTEncoder | PrithviViTEncoder | GroupedChannelViTEncoder

# Prithvi-100M was pretrained on HLS blue, green, red, narrow NIR, SWIR 1, SWIR 2 = Sentinel-2 B02, B03, B04, B8A,
# B11, B12: the default, picked by name from our MODEL_BANDS-ordered data. "bench" repeats the original loader's
# index picks (0, 1, 2, 4, 5, 6) of the bench's band order (pb/utils/load_data.py callback_preprocess_prithvi),
# which on PhilEO Bench data are B02, B03, B04, B05, B06, B07 (red edge, not NIR/SWIR): its comment names them
# "HLS bands B02..B07", HLS-L30 names under which B05/B06/B07 ARE NIR/SWIR1/SWIR2, so those picks were right only
# for files holding HLS-ordered channels, not for Sentinel-2-ordered ones (docs/models.md "ViT models").
PRITHVI_BANDS: dict[str, tuple[str, ...]] = {
    "hls": ("B02", "B03", "B04", "B8A", "B11", "B12"),
    "bench": ("B02", "B03", "B04", "B05", "B06", "B07"),
}
# Prithvi's encoder without pos_embed: what a checkpoint must hold and what --mode frozen freezes.
PRITHVI_ENCODER_PREFIXES: tuple[str, ...] = (
    "vit_encoder.cls_token", "vit_encoder.patch_embed.", "vit_encoder.blocks.", "vit_encoder.norm.")


class ZooViTModel(nn.Module):
    """What every zoo ViT model shares: the `vit_encoder`, the zoo contract's attributes, encode()."""

    is_downstream = True

    def _init_encoder(self, encoder: ZooViTEncoder, output_dim: int, input_spec: InputSpec,
                      encoder_prefixes: tuple[str, ...]) -> None:
        if input_spec.in_chans != _in_chans(encoder) or input_spec.img_size != encoder.img_size:
            raise ValueError(f"input spec ({input_spec.in_chans} bands, {input_spec.img_size} px) does not match "
                             f"the encoder ({_in_chans(encoder)} bands, {encoder.img_size} px)")
        self.input_spec = input_spec
        self.in_chans, self.img_size, self.out_chans = input_spec.in_chans, input_spec.img_size, output_dim
        self.vit_encoder = encoder
        self.encoder_prefixes = encoder_prefixes
        self.pretrained_prefixes = encoder_prefixes
        # Published files hold the bare encoder (MAE / SatMAE / Prithvi keys); our own files "vit_encoder.*".
        self.pretrained_key_map = {"": "vit_encoder."}

    def encoder_parameters(self) -> Iterator[nn.Parameter]:
        """The pretrained encoder's parameters (under encoder_prefixes): what --mode frozen freezes."""
        for name, param in self.named_parameters():
            if name.startswith(self.encoder_prefixes):
                yield param

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The encoder's normed tokens (B, 1 + N, D), CLS first."""
        check_input(x, self.in_chans, self.img_size)
        return self.vit_encoder(x)[0]

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D): the normed CLS token (what the classifiers' head reads)."""
        return self.forward_features(x)[:, 0]


def _in_chans(encoder: ZooViTEncoder) -> int:
    return encoder.in_c if isinstance(encoder, GroupedChannelViTEncoder) else encoder.patch_embed.proj.in_channels


class ZooViTDense(ZooViTModel):
    """A dense zoo model (the bench's Prithvi, SatMAE, ViTCNN, ViTCNN_gc): (B, C, H, W) -> (B, output_dim, H, W)."""

    def __init__(self, encoder: ZooViTEncoder, *, output_dim: int, input_spec: InputSpec,
                 encoder_prefixes: tuple[str, ...] = ("vit_encoder.",), downsample_blocks: int,
                 decoder_depths: Sequence[int], decoder_dims: Sequence[int]) -> None:
        super().__init__()
        self._init_encoder(encoder, output_dim, input_spec, encoder_prefixes)
        groups = len(encoder.channel_groups) if isinstance(encoder, GroupedChannelViTEncoder) else 1
        embedding_dim = encoder.embed_dim * groups  # the token map's channels
        decoded = encoder.grid_size // 2**downsample_blocks * 2 ** len(decoder_dims)
        if decoded != encoder.img_size:
            raise ValueError(f"a {encoder.grid_size} px token map, {downsample_blocks} downsampling blocks and "
                             f"{len(decoder_dims)} decoder stages give {decoded} px, not {encoder.img_size}")
        # Attribute order = the original's, so the state-dict order matches (models/model_SatMAE.py:148-172).
        self.decoder_head = CoreDecoder(embedding_dim=embedding_dim, output_dim=output_dim, depths=decoder_depths,
                                        dims=decoder_dims, activation="relu", norm="batch", padding="same")
        self.decoder_downsample_block: nn.Module = nn.Sequential(*(
            EncoderBlock(1, embedding_dim, embedding_dim, norm="batch", activation="relu", padding="same")
            for _ in range(downsample_blocks)
        )) if downsample_blocks else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feature_map = self.vit_encoder.tokens_to_map(self.forward_features(x))
        return self.decoder_head(self.decoder_downsample_block(feature_map))


class ZooViTClassifier(ZooViTModel):
    """A zoo classifier (the bench's PrithviClassifier, SatMAE_Classifier, ViTCNN(_gc)_Classifier): CLS -> MLP."""

    per_patch_output = True  # (B, output_dim) logits: built for the classification tasks

    def __init__(self, encoder: ZooViTEncoder, *, output_dim: int, input_spec: InputSpec,
                 encoder_prefixes: tuple[str, ...] = ("vit_encoder.",)) -> None:
        super().__init__()
        self._init_encoder(encoder, output_dim, input_spec, encoder_prefixes)
        width = encoder.embed_dim
        self.classification_head = nn.Sequential(
            nn.Linear(width, width // 2), nn.LayerNorm(width // 2), nn.ReLU(), nn.Linear(width // 2, output_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classification_head(self.encode(x))


# ------------------------------------------------------------------------------------------ configurations

_ENCODERS = {"plain": PlainViTEncoder, "prithvi": PrithviViTEncoder, "grouped": GroupedChannelViTEncoder}
_NANO_DECODER = dict(decoder_depths=CORE_NANO_DECODER_DEPTHS, decoder_dims=CORE_NANO_DECODER_DIMS)
_TINY_DECODER = dict(decoder_depths=(1, 1, 1, 1), decoder_dims=(16, 16, 32, 32))  # SE blocks need >= 16
_TINY_VIT = dict(embed_dim=32, depth=2, num_heads=2)

# Named configurations (every field can be overridden: build("vit-cnn", depth=12)). "kind" picks the encoder;
# the encoder fields are the originals' (Prithvi_100M_config.py, model_SatMAE.py vit_large,
# model_AutoEncoderViTPretrained.py vit_large / vit_base_gc).
_PRITHVI = dict(kind="prithvi", img_size=224, patch_size=16, in_chans=6, embed_dim=768, depth=12, num_heads=12,
                norm_eps=1e-5, downsample_blocks=0, bands="hls")
_SATMAE = dict(kind="grouped", img_size=96, patch_size=8, in_chans=10, channel_embed=256, embed_dim=1024, depth=24,
               num_heads=16, norm_eps=1e-6, downsample_blocks=1)
_VIT_CNN = dict(kind="plain", img_size=128, patch_size=4, in_chans=10, embed_dim=1024, depth=24, num_heads=16,
                norm_eps=1e-6, downsample_blocks=2)
_VIT_CNN_GC = dict(kind="grouped", img_size=128, patch_size=4, in_chans=10, channel_embed=256, embed_dim=768,
                   depth=12, num_heads=12, norm_eps=1e-6, downsample_blocks=2)
CONFIGS: dict[str, dict] = {
    "prithvi-100m": {**_PRITHVI, **_NANO_DECODER},
    "prithvi-100m-tiny": {**_PRITHVI, **_TINY_DECODER, **_TINY_VIT},
    "satmae": {**_SATMAE, **_NANO_DECODER},
    "satmae-tiny": {**_SATMAE, **_TINY_DECODER, **_TINY_VIT, "channel_embed": 8},
    "vit-cnn": {**_VIT_CNN, **_NANO_DECODER},
    "vit-cnn-tiny": {**_VIT_CNN, **_TINY_DECODER, **_TINY_VIT},
    "vit-cnn-gc": {**_VIT_CNN_GC, **_NANO_DECODER},
    "vit-cnn-gc-tiny": {**_VIT_CNN_GC, **_TINY_DECODER, **_TINY_VIT, "channel_embed": 8},
}
_MODEL_FIELDS = ("kind", "downsample_blocks", "decoder_depths", "decoder_dims", "bands")


def prithvi_bands(bands: str | Sequence[str]) -> tuple[str, ...]:
    """Prithvi's six input bands: "hls" (default), "bench", or six names from MODEL_BANDS ("B02,B03,...")."""
    if isinstance(bands, str):
        bands = PRITHVI_BANDS[bands] if bands in PRITHVI_BANDS else tuple(b.strip() for b in bands.split(","))
    bands = tuple(bands)
    if len(bands) != len(PRITHVI_BANDS["hls"]) or not set(bands) <= set(MODEL_BANDS):
        raise ValueError(f"bands={','.join(bands)}: expected one of {', '.join(PRITHVI_BANDS)} or six band names "
                         f"from {','.join(MODEL_BANDS)}")
    return bands


def _input_spec(config: dict) -> InputSpec:
    kind, img_size = config["kind"], config["img_size"]
    if kind == "prithvi":
        return InputSpec(bands=prithvi_bands(config["bands"]), img_size=img_size, normalize="prithvi")
    if img_size == 96:  # SatMAE: its 96 px input cut from the centre of the 128 px bench patch
        return InputSpec(img_size=96, normalize="satmae", crop_from=128)
    return InputSpec(img_size=img_size)


def build_zoo_vit(name: str, output_dim: int = 1, classifier: bool = False, **overrides) -> ZooViTModel:
    """The registered model `name` (a key of CONFIGS) with `overrides` replacing config fields."""
    config = CONFIGS[name]
    unknown = sorted(set(overrides) - set(config))
    if unknown:
        raise ValueError(f"{name}: unknown override(s) {unknown}; known: {sorted(config)}")
    config = {**config, **overrides}
    encoder = _ENCODERS[config["kind"]](**{k: v for k, v in config.items() if k not in _MODEL_FIELDS})
    prefixes = PRITHVI_ENCODER_PREFIXES if config["kind"] == "prithvi" else ("vit_encoder.",)
    spec = _input_spec(config)
    if classifier:
        return ZooViTClassifier(encoder, output_dim=output_dim, input_spec=spec, encoder_prefixes=prefixes)
    return ZooViTDense(encoder, output_dim=output_dim, input_spec=spec, encoder_prefixes=prefixes,
                       downsample_blocks=config["downsample_blocks"], decoder_depths=config["decoder_depths"],
                       decoder_dims=config["decoder_dims"])
