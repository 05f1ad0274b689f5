"""Export Flax TResNet weights as a PyTorch checkpoint: timm's layout, or ML-Decoder's official one.

    python convert/flax_to_torch.py tresnet_m tresnet_m_from_jax.safetensors
    python convert/flax_to_torch.py runs/m1/weights model.pth
    python convert/flax_to_torch.py tresnet_m.ml_decoder_coco_224 tresnet_m_COCO_224.pth

A model with the fc head is written as a timm-layout state_dict, which loads with
``timm.create_model(name, num_classes=N).load_state_dict(sd, strict=True)`` (name as printed;
the official tresnet_l_v2 becomes timm's tresnet_v2_l, whose LeakyReLU slopes differ), for
PyTorch or ONNX tooling; ``.safetensors`` or torch.save format by suffix. A model with an
ML-Decoder head is written as ML-Decoder's code saves its models (timm has no constructor for
it): ``torch.save({"model": <official layout: InPlaceABN body, head.decoder.*>, "idx_to_class":
{0: name, ...}})``, which its ``model.load_state_dict(state["model"], strict=True)`` takes.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from tresnet_jax.cli import command
from tresnet_jax.factory import load
from tresnet_jax.model.architecture import ML_DECODER
from tresnet_jax.weights.conversion import variables_to_official_state_dict, variables_to_state_dict
from tresnet_jax.weights.torch_io import write_official_checkpoint, write_state_dict

TIMM_NAMES = {"tresnet_l_v2": "tresnet_v2_l"}
# ML-Decoder's code calls its all-Bottleneck TResNets tresnet_l and tresnet_xl.
ML_DECODER_NAMES = {"tresnet_v2_l": "tresnet_l", "tresnet_v2_xl": "tresnet_xl"}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("weights", help="name of converted weights or a weights directory")
    parser.add_argument(
        "output", type=Path, help="output file: .safetensors, or .pth/.pt/.bin for torch.save (ML-Decoder: .pth)"
    )
    parser.add_argument("--force", action="store_true", help="replace an existing output file")
    return parser.parse_args(argv)


@command
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    loaded = load(args.weights)
    info = loaded.info
    if info.head.kind == ML_DECODER:
        state_dict = variables_to_official_state_dict(loaded.variables, info.arch)
        write_official_checkpoint(args.output, state_dict, info.class_names, force=args.force)
        names = "its class names" if info.class_names else "no class names (none recorded)"
        head = "--zsl 1" if info.head.zero_shot else f"--num-of-groups {info.head.num_groups or -1}"
        print(
            f"wrote {args.output}: ML-Decoder's official layout, {len(state_dict)} tensors under 'model' and {names}, "
            f"for its --model-name {ML_DECODER_NAMES.get(info.model, info.model)} --num-classes {info.num_classes} "
            f"{head}"
        )
        return 0
    state_dict = variables_to_state_dict(loaded.variables)
    write_state_dict(args.output, state_dict, force=args.force)
    name = TIMM_NAMES.get(info.model, info.model)
    classes = info.num_classes
    print(f"wrote {args.output}: {len(state_dict)} tensors for timm.create_model({name!r}, num_classes={classes})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
