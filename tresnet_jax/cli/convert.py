"""Convert a PyTorch TResNet checkpoint (official or timm layout) into Flax weights.

    python convert/torch_to_flax.py tresnet_m.pth
    python convert/torch_to_flax.py hf-hub:timm/tresnet_m.miil_in1k        # from the Hugging Face hub
    python convert/torch_to_flax.py MS_COCO_TRresNet_L_448_86.6.pth        # ASL's multi-label COCO model
    python convert/torch_to_flax.py tresnet_m_COCO_224_84_2.pth             # ML-Decoder's (head from the tensors)
    python convert/torch_to_flax.py model.safetensors --model tresnet_m --num-classes 10 --name m_c10

Writes an Orbax checkpoint and metadata.json to $TRESNET_JAX_WEIGHTS/<name> (default
~/.cache/tresnet_jax/weights/<name>; <name> = the model name for a file, the tag for a hub
repository or for a tag published only as a file, such as ASL's and ML-Decoder's), where
tresnet_jax.load(name) and eval.py --model find it. A pretrained tag is recorded only when --tag,
the hub repository, a file name holding the whole tag or a published file name (ASL's,
ML-Decoder's) says so, and only when its head is the checkpoint's (fc, or ML-Decoder with as many
queries, read off the tensors).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from tresnet_jax.cli import add_multi_label_argument, command
from tresnet_jax.data.labels_csv import read_class_file
from tresnet_jax.model.architecture import ML_DECODER
from tresnet_jax.model.registry import ARCHITECTURES, PRETRAINED, resolve
from tresnet_jax.weights.conversion import convert_checkpoint
from tresnet_jax.weights.hub import HUB_PREFIX, HubRepo, convert_fetched, fetch
from tresnet_jax.weights.storage import check_writable, save_weights, weights_root
from tresnet_jax.weights.torch_io import read_checkpoint


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "checkpoint", help=".pth/.pt/.bin (torch.save) or .safetensors file, or hf-hub:OWNER/NAME[@REVISION]"
    )
    parser.add_argument("--model", choices=list(ARCHITECTURES), help="variant (default: inferred from the tensors)")
    parser.add_argument(
        "--num-classes", type=int, help="classes of the new head (default: the checkpoint's; 0: no head)"
    )
    parser.add_argument(
        "--tag",
        choices=list(PRETRAINED),
        help="pretrained configuration (default: from the hub repository or the "
        "file name; else none, and the model's published preprocessing)",
    )
    add_multi_label_argument(parser)
    parser.add_argument("--classes", type=Path, metavar="FILE", help="the names of the head's classes, one a line")
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
    model = resolve(args.model) if args.model else None  # the name looked up once, here
    conversion = (model, args.num_classes, args.tag)
    if args.checkpoint.startswith(HUB_PREFIX):
        repo = HubRepo.parse(args.checkpoint)
        print(f"fetching {repo} from the Hugging Face hub")
        converted, info = convert_fetched(repo, fetch(repo), *conversion)
        default_name = repo.storage_name if args.num_classes is None else None
    else:
        source = Path(args.checkpoint)
        checkpoint = read_checkpoint(source)
        names = read_class_file(args.classes) if args.classes else checkpoint.class_names
        converted, info = convert_checkpoint(
            checkpoint.state_dict, source, *conversion, class_names=names, multi_label=args.multi_label
        )
        # A tag published only as a file (ASL's) is found by its name: tresnet_jax.load(tag).
        default_name = info.tag if info.tag is not None and not PRETRAINED[info.tag].on_hub else None
    output = args.output or weights_root() / (args.name or default_name or converted.model_name)
    check_writable(output.absolute(), args.force)
    print(
        f"read {args.checkpoint}: {converted.layout} layout, {converted.model_name} with "
        f"{converted.checkpoint_classes} classes"
        + ("" if args.model else " (inferred)")
        + (f", head {converted.head.describe()}" if converted.head.kind == ML_DECODER else "")
    )
    for note in info.notes:
        print(f"note: {note}")
    prep = info.preprocessing
    print(
        f"preprocessing: {prep.input_size}px, crop {prep.crop_pct}, {prep.interpolation}"
        + (", squish " if prep.squish else " ")
        + (f"(tag {info.tag})" if info.tag else "(no pretrained tag: --tag sets one)")
    )
    if info.multi_label:
        names = info.class_names
        reported = info.reported
        print(
            f"multi-label: a sigmoid per class, {len(names) if names else 'no'} class names"
            + (f" ({', '.join(names[:3])}, ...)" if names else "")
            + (f"; reported mAP {reported.mAP} on {reported.dataset}" if reported and reported.mAP else "")
        )
    written = save_weights(output, converted.variables, info, force=args.force)
    print(f"wrote {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
