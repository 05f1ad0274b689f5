"""Convert a PyTorch TResNet checkpoint (official or timm layout) into Flax weights.

    python convert/torch_to_flax.py tresnet_m.pth
    python convert/torch_to_flax.py model.safetensors --model tresnet_m --num-classes 10 --name m_c10

Writes an Orbax checkpoint and metadata.json to $TRESNET_JAX_WEIGHTS/<name> (default
~/.cache/tresnet_jax/weights/<name>, <name> = the model name), where tresnet_jax.load(name)
and eval.py --model find it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from tresnet_jax.cli import command
from tresnet_jax.conversion import choose_config, convert_state_dict, weights_metadata
from tresnet_jax.errors import InputError
from tresnet_jax.registry import ARCHITECTURES, PRETRAINED
from tresnet_jax.storage import check_writable, save_weights, weights_root
from tresnet_jax.torch_io import read_state_dict


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help=".pth/.pt/.bin (torch.save) or .safetensors file")
    parser.add_argument("--model", choices=list(ARCHITECTURES), help="variant (default: inferred from the tensors)")
    parser.add_argument(
        "--num-classes", type=int, help="classes of the new head (default: the checkpoint's; 0: no head)"
    )
    parser.add_argument("--tag", choices=list(PRETRAINED), help="pretrained configuration (default: guessed)")
    parser.add_argument("--name", help="name to store under (default: the model name)")
    parser.add_argument("--output", type=Path, help="output directory (default: <weights root>/<name>)")
    parser.add_argument("--force", action="store_true", help="replace existing output")
    args = parser.parse_args(argv)
    if args.num_classes is not None and args.num_classes < 0:
        parser.error("--num-classes must be >= 0")
    return args


@command
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.output is not None:
        check_writable(args.output.absolute(), args.force)
    state_dict = read_state_dict(args.checkpoint)
    try:
        converted = convert_state_dict(state_dict, args.model, args.num_classes)
    except InputError as err:
        raise InputError(f"{args.checkpoint}: {err}") from None
    cfg, guessed = choose_config(
        converted.model_name, converted.num_classes, str(args.checkpoint), converted.layout, args.tag
    )
    output = args.output or weights_root() / (args.name or converted.model_name)
    check_writable(output.absolute(), args.force)
    print(
        f"read {args.checkpoint}: {converted.layout} layout, {len(state_dict)} tensors, "
        f"{converted.model_name} with {converted.checkpoint_classes} classes"
        + ("" if args.model else " (inferred)")
    )
    for note in converted.notes:
        print(f"note: {note}")
    print(
        f"preprocessing: {cfg.input_size}px, crop {cfg.crop_pct}, {cfg.interpolation}"
        + ("" if converted.head_replaced else f" (tag {cfg.tag}{', guessed: --tag sets it' if guessed else ''})")
    )
    metadata = weights_metadata(converted, cfg, args.checkpoint, tag_guessed=guessed)
    written = save_weights(output, converted.variables, metadata, force=args.force)
    print(f"wrote {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
