"""Build the ORIGINAL PhilEO Bench ViT models: parameter counts, state-dict listings, and our outputs against theirs.

    python tools/original_zoo_vit.py --orig-bench /path/to/phileo-bench [--listings tests/data] [--compare]

The bench (91097luke/phileo-bench) is imported from --orig-bench as it is; the imports its model files need but
the models never call (buteo, einops) are replaced by tiny stand-ins. The models are built as training_script.py
`get_models_pretrained` builds them (output_dim=1, "core_nano" decoder), on the meta device and without their
checkpoint loading (nothing is downloaded). Prints `name all trainable` per model; with --listings, writes
`<name>_state_dict.txt` (key<TAB>shape per line, in state-dict order) for tests/test_models_zoo_vit.py.
With --compare, builds the originals at our "-tiny" configurations with random weights (fixed tables and
BatchNorm statistics included), loads them strictly into ours and prints the largest output difference (eval mode).
"""

from __future__ import annotations

import argparse
import sys
import types
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn

NAMES = ["prithvi-100m", "prithvi-100m-classifier", "satmae", "satmae-classifier", "vit-cnn", "vit-cnn-classifier",
         "vit-cnn-gc", "vit-cnn-gc-classifier"]


def _install_stubs() -> None:
    """Stand-ins for bench imports that the model classes never call."""
    buteo = types.ModuleType("buteo")
    buteo.MultiArray = type("MultiArray", (), {})
    sys.modules.setdefault("buteo", buteo)
    einops = types.ModuleType("einops")
    einops.rearrange = lambda *args, **kwargs: None
    sys.modules.setdefault("einops", einops)


def original_builders(tiny: bool) -> dict[str, Callable[[], nn.Module]]:
    """Registry name -> a builder of the original model (at our -tiny configuration when `tiny`, output_dim 3)."""
    from models.model_AutoEncoderViTPretrained import ViTCNN, ViTCNN_gc, get_core_decoder_kwargs
    from models.model_AutoEncoderViTPretrained_classifier import ViTCNN_Classifier, ViTCNN_gc_Classifier
    from models.model_SatMAE import SatMAE, SatMAE_Classifier
    from models.models_Prithvi import Prithvi, PrithviClassifier
    from utils.Prithvi_100M_config import model_args

    out = 3 if tiny else 1
    nano = get_core_decoder_kwargs(output_dim=out, core_size="core_nano")
    decoder = dict(nano, decoder_depths=[1, 1, 1, 1], decoder_dims=[16, 16, 32, 32]) if tiny else nano
    ln6 = partial(nn.LayerNorm, eps=1e-6)  # vit_large / vit_base_gc pass it; Prithvi keeps nn.LayerNorm
    small = dict(embed_dim=32, depth=2, num_heads=2)
    prithvi = {**model_args, **small} if tiny else model_args
    satmae = dict(channel_embed=8, **small) if tiny else dict(channel_embed=256, embed_dim=1024, depth=24, num_heads=16)
    vit = small if tiny else dict(embed_dim=1024, depth=24, num_heads=16)
    gc = dict(channel_embed=8, **small) if tiny else dict(channel_embed=256, embed_dim=768, depth=12, num_heads=12)
    return {
        "prithvi-100m": lambda: Prithvi(**decoder, **prithvi),
        "prithvi-100m-classifier": lambda: PrithviClassifier(output_dim=out, **prithvi),
        "satmae": lambda: SatMAE(img_size=96, patch_size=8, in_chans=10, norm_layer=ln6, **satmae, **decoder),
        "satmae-classifier": lambda: SatMAE_Classifier(img_size=96, patch_size=8, in_chans=10, output_dim=out,
                                                       norm_layer=ln6, **satmae),
        "vit-cnn": lambda: ViTCNN(chw=(10, 128, 128), patch_size=4, norm_layer=ln6, **vit, **decoder),
        "vit-cnn-classifier": lambda: ViTCNN_Classifier(chw=(10, 128, 128), patch_size=4, output_dim=out,
                                                        norm_layer=ln6, **vit),
        "vit-cnn-gc": lambda: ViTCNN_gc(img_size=128, patch_size=4, in_chans=10, norm_layer=ln6, **gc, **decoder),
        "vit-cnn-gc-classifier": lambda: ViTCNN_gc_Classifier(img_size=128, patch_size=4, in_chans=10,
                                                              output_dim=out, norm_layer=ln6, **gc),
    }


def _randomise(model: nn.Module) -> None:
    """Random weights everywhere, the fixed sin-cos tables and BatchNorm statistics included."""
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.1)
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 1.5)


def tiny_name(name: str) -> str:
    """Our -tiny variant of a registry name: satmae-classifier -> satmae-tiny-classifier."""
    family = name.removesuffix("-classifier")
    return f"{family}-tiny{name[len(family):]}"


def compare(name: str, make: Callable[[], nn.Module]) -> float:
    """Largest |original - ours| on one random batch, our -tiny model holding the original's weights."""
    from phileo.models import build

    torch.manual_seed(0)
    original = make().eval()
    _randomise(original)
    ours = build(tiny_name(name), output_dim=3).eval()
    ours.load_state_dict(original.state_dict(), strict=True)
    x = torch.randn(2, ours.in_chans, ours.img_size, ours.img_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return float((original(x) - ours(x)).abs().max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--orig-bench", type=Path, required=True, help="a checkout of 91097luke/phileo-bench")
    parser.add_argument("--listings", type=Path, help="write <name>_state_dict.txt files into this folder")
    parser.add_argument("--compare", action="store_true", help="our -tiny models against the originals")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")  # the bench's timm.models.layers import is deprecated
    _install_stubs()
    sys.path.insert(0, str(args.orig_bench))
    for name, make in original_builders(tiny=False).items():
        with torch.device("meta"):
            model = make()
        total = sum(p.numel() for p in model.parameters())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(f"{name} {total} {trainable}")
        if args.listings:
            lines = [f"{key}\t{','.join(map(str, t.shape))}\n" for key, t in model.state_dict().items()]
            (args.listings / f"{name.replace('-', '_')}_state_dict.txt").write_text("".join(lines))
    if args.compare:
        for name, make in original_builders(tiny=True).items():
            print(f"{tiny_name(name)}: max |original - ours| = {compare(name, make):.3g}")


if __name__ == "__main__":
    main()
