"""Build the ORIGINAL PhilEO Bench CNN models and print their parameter counts and state-dict listings.

    python tools/original_zoo_cnn.py --orig-bench /path/to/phileo-bench [--listings tests/data] [--compare]

The bench (91097luke/phileo-bench) is imported from --orig-bench as it is; the few imports it needs but the
models do not use (buteo, pytorch_lightning) are replaced by tiny stand-ins. Every model is built with
input_dim=10, output_dim=1, as training_script.py `get_models` / `get_models_pretrained` build them (the
GeoAware ones from a generated CoreEncoder-nano checkpoint, SeCo from a MocoV2 with random weights: nothing
is downloaded). With --listings, writes `<name>_state_dict.txt` (key<TAB>shape per line, in state-dict order)
for tests/test_models_zoo_cnn.py. With --compare, loads each original's weights into our registry model of the
same name and prints whether the outputs are bit-equal (ResNet / SeCo: ours gets the RGB the original selects).
"""

from __future__ import annotations

import argparse
import inspect
import sys
import types
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn


def _install_stubs() -> None:
    """Stand-ins for the bench imports that the model classes never call."""
    buteo = types.ModuleType("buteo")
    for name in ("MultiArray", "Dataset", "DatasetAugmentation"):
        setattr(buteo, name, type(name, (), {}))
    sys.modules.setdefault("buteo", buteo)

    class LightningModule(nn.Module):
        def save_hyperparameters(self) -> None:
            caller = inspect.currentframe().f_back
            args = {k: v for k, v in caller.f_locals.items() if k not in ("self", "__class__", "args", "kwargs")}
            self.hparams = types.SimpleNamespace(**args)

    lightning = types.ModuleType("pytorch_lightning")
    lightning.LightningModule = LightningModule
    sys.modules.setdefault("pytorch_lightning", lightning)


def original_builders() -> dict[str, Callable[[], nn.Module]]:
    """Registry name -> a builder of the original model, as the bench's training_script.py builds it."""
    from models.model_AutoEncoderViTPretrained import get_core_decoder_kwargs
    from models.model_Baseline import BaselineNet
    from models.model_CoreCNN_versions import Core_nano, CoreUnet_nano
    from models.model_GeoAwarePretrained import CoreEncoderGeoPretrained, get_core_encoder_kwargs
    from models.model_GeoAwarePretrained_classifier import CoreEncoderGeoPretrained_Classifier
    from models.model_Resnet50 import resnet
    from models.model_Seco import seasonal_contrast
    from models.seco_utils import moco2_module

    # The published SeCo file is a MocoV2 lightning checkpoint; a random one has the same modules.
    moco2_module.MocoV2.load_from_checkpoint = classmethod(
        lambda cls, path, map_location=None: cls("resnet50", emb_dim=128, num_negatives=16))

    def geo_checkpoint() -> dict[str, torch.Tensor]:
        # The GeoAware pretraining checkpoint is a CoreEncoder-nano state dict ("CoreEncoder_last_8.pt").
        return Core_nano(input_dim=10, output_dim=1).state_dict()

    decoder = get_core_decoder_kwargs(output_dim=1, core_size="core_nano")
    return {
        "baseline-cnn": lambda: BaselineNet(input_dim=10, output_dim=1),
        "core-unet-nano": lambda: CoreUnet_nano(input_dim=10, output_dim=1),
        "core-encoder-nano": lambda: Core_nano(input_dim=10, output_dim=1),
        "geoaware-core-nano": lambda: CoreEncoderGeoPretrained(
            1, checkpoint=geo_checkpoint(), freeze_body=False,
            core_encoder_kwargs=get_core_encoder_kwargs(1, 10, "core_nano", full_unet=True)),
        "geoaware-core-nano-classifier": lambda: CoreEncoderGeoPretrained_Classifier(
            checkpoint=geo_checkpoint(), freeze_body=False,
            core_encoder_kwargs=get_core_encoder_kwargs(1, 10, "core_nano", full_unet=False)),
        "resnet50": lambda: resnet(imagenet_weights=False, **decoder),
        "resnet50-classifier": lambda: resnet(imagenet_weights=False, classifier=True, **decoder),
        "seco-resnet50": lambda: seasonal_contrast("unused.ckpt", **decoder),
        "seco-resnet50-classifier": lambda: seasonal_contrast("unused.ckpt", classifier=True, **decoder),
        "seco-moco-checkpoint": lambda: moco2_module.MocoV2("resnet50", emb_dim=128, num_negatives=16),
    }


def outputs_equal(name: str, original: nn.Module) -> bool:
    """Our model with the original's (slightly perturbed) weights: same output on the same input?"""
    from phileo.models import build

    ours = build(name).eval()
    state = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v
             for k, v in original.state_dict().items()}
    original.eval().load_state_dict(state)
    ours.load_state_dict(state, strict=True)
    x = torch.rand(2, 10, 64, 64)
    with torch.no_grad():
        return torch.equal(original(x), ours(x[:, [2, 1, 0]] if ours.in_chans == 3 else x))


def listing(model: nn.Module) -> str:
    return "".join(f"{k}\t{','.join(map(str, v.shape))}\n" for k, v in model.state_dict().items())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--orig-bench", type=Path, required=True, help="checkout of 91097luke/phileo-bench")
    parser.add_argument("--listings", type=Path, help="write <name>_state_dict.txt files here")
    parser.add_argument("--compare", action="store_true", help="check our models' outputs against the originals")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(args.orig_bench))
    _install_stubs()
    for name, builder in original_builders().items():
        torch.manual_seed(0)
        model = builder()
        params = sum(p.numel() for p in model.parameters())
        comparable = args.compare and "checkpoint" not in name
        equal = f"\toutputs bit-equal: {outputs_equal(name, model)}" if comparable else ""
        sys.stdout.write(f"{name}\t{params}{equal}\n")
        if args.listings is not None:
            (args.listings / f"{name.replace('-', '_')}_state_dict.txt").write_text(listing(model))


if __name__ == "__main__":
    main()
