"""Export Flax TResNet weights as a timm-layout PyTorch state_dict.

    python convert/flax_to_torch.py tresnet_m tresnet_m_from_jax.safetensors
    python convert/flax_to_torch.py runs/m1/weights model.pth

The file loads with ``timm.create_model(name, num_classes=N).load_state_dict(sd, strict=True)``
(name as printed; the official tresnet_l_v2 becomes timm's tresnet_v2_l, whose LeakyReLU
slopes differ), for PyTorch or ONNX tooling. ``.safetensors`` or torch.save format by suffix.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from tresnet_jax.cli import command
from tresnet_jax.factory import load
from tresnet_jax.weights.conversion import variables_to_state_dict
from tresnet_jax.weights.torch_io import write_state_dict

TIMM_NAMES = {"tresnet_l_v2": "tresnet_v2_l"}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("weights", help="name of converted weights or a weights directory")
    parser.add_argument("output", type=Path, help="output file: .safetensors, or .pth/.pt/.bin for torch.save")
    parser.add_argument("--force", action="store_true", help="replace an existing output file")
    return parser.parse_args(argv)


@command
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    loaded = load(args.weights)
    state_dict = variables_to_state_dict(loaded.variables)
    write_state_dict(args.output, state_dict, force=args.force)
    name = TIMM_NAMES.get(loaded.info.model, loaded.info.model)
    classes = loaded.info.num_classes
    print(f"wrote {args.output}: {len(state_dict)} tensors for timm.create_model({name!r}, num_classes={classes})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
