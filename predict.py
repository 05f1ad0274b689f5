"""Top-5 classes of images, with probabilities.

    python predict.py cat.jpg dog.png                              # tresnet_m's pretrained weights
    python predict.py photo.jpg --model tresnet_l.miil_in1k_448
    python predict.py photo.jpg --model runs/f1/export             # weights trained on your classes
    python predict.py photo.jpg --weights tresnet_m.miil_in1k.safetensors

--model takes what eval.py's does: a weights name or directory, a pretrained tag (fetched from
the Hugging Face hub the first time), hf-hub:OWNER/NAME or an architecture (its default tag).
Class names: the weights' own (training exports keep their dataset's), ImageNet's for
1000-class weights, else class indices.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np

from tresnet_jax.cli import command, enable_compilation_cache
from tresnet_jax.data.classes import imagenet_classes
from tresnet_jax.data.preprocess import Preprocessing, check_image_size, load_image
from tresnet_jax.errors import InputError
from tresnet_jax.model.registry import resolve
from tresnet_jax.runtime.compile import jit
from tresnet_jax.weights.factory import load_any

TOP = 5


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="+", type=Path, help="JPEG/PNG/... files")
    parser.add_argument(
        "--model",
        help="weights name or directory, pretrained tag, hf-hub:OWNER/NAME or architecture (default: tresnet_m)",
    )
    parser.add_argument(
        "--weights", help="weights directory, or a .pth/.pt/.bin/.safetensors file (--model: its architecture)"
    )
    parser.add_argument("--image-size", type=int, help="default: the weights' pretrained input size")
    args = parser.parse_args(argv)
    if args.image_size is not None:
        check_image_size(args.image_size)
    return args


def class_names(num_classes: int, stored: list[str] | None = None) -> list[str]:
    """The weights' own class names, ImageNet's for a 1000-class model, class indices otherwise."""
    if stored is not None and len(stored) == num_classes:
        return [str(name) for name in stored]
    if num_classes == len(imagenet_classes()):
        return [f"{names.split(',')[0]} ({wnid})" for wnid, names in imagenet_classes()]
    return [f"class {i}" for i in range(num_classes)]


@command
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    enable_compilation_cache()
    loaded = load_any(
        args.weights or args.model or "tresnet_m", resolve(args.model) if args.weights and args.model else None
    )
    model, variables, metadata = loaded.model, loaded.variables, loaded.metadata
    print(f"weights: {loaded.origin}")
    if model.num_classes == 0:
        raise InputError(f"{metadata['model']} weights without a classifier head cannot predict classes")
    prep = Preprocessing.from_dict(metadata["preprocessing"])
    if args.image_size:
        prep = Preprocessing(args.image_size, prep.crop_pct, prep.interpolation)
    images, names, failures = [], [], 0
    for path in args.images:
        try:
            images.append(load_image(path, prep))
            names.append(path)
        except InputError as err:
            print(f"error: {err}", file=sys.stderr)
            failures += 1
    if images:
        probabilities = np.asarray(jax.nn.softmax(jit(model.apply)(variables, np.stack(images)), axis=-1))
        labels = class_names(model.num_classes, metadata.get("class_names"))
        for path, p in zip(names, probabilities, strict=True):
            print(f"{path}:")
            for index in np.argsort(-p)[:TOP]:
                print(f"  {100 * p[index]:6.2f}%  {labels[index]}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
