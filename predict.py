"""Top-5 classes of images, with probabilities.

    python predict.py cat.jpg dog.png --model tresnet_m
    python predict.py photo.jpg --weights tresnet_m.miil_in1k.safetensors
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np

from tresnet_jax.classes import imagenet_classes
from tresnet_jax.cli import command, enable_compilation_cache
from tresnet_jax.errors import InputError
from tresnet_jax.factory import load_any
from tresnet_jax.preprocess import Preprocessing, load_image

TOP = 5


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="+", type=Path, help="JPEG/PNG/... files")
    parser.add_argument("--model", help="converted weights by name (default: tresnet_m)")
    parser.add_argument("--weights", help="weights directory, or a .pth/.pt/.bin/.safetensors file")
    parser.add_argument("--image-size", type=int, help="default: the weights' pretrained input size")
    return parser.parse_args(argv)


def class_names(num_classes: int) -> list[str]:
    """ImageNet names for a 1000-class model, class indices otherwise."""
    if num_classes == len(imagenet_classes()):
        return [f"{names.split(',')[0]} ({wnid})" for wnid, names in imagenet_classes()]
    return [f"class {i}" for i in range(num_classes)]


@command
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    enable_compilation_cache()
    model, variables, metadata = load_any(args.weights or args.model or "tresnet_m", args.model)
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
        probabilities = np.asarray(jax.nn.softmax(jax.jit(model.apply)(variables, np.stack(images)), axis=-1))
        labels = class_names(model.num_classes)
        for path, p in zip(names, probabilities, strict=True):
            print(f"{path}:")
            for index in np.argsort(-p)[:TOP]:
                print(f"  {100 * p[index]:6.2f}%  {labels[index]}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
