"""Top-5 classes of images, with probabilities; for multi-label weights, every class above a
threshold.

    python predict.py cat.jpg dog.png                              # tresnet_m's pretrained weights
    python predict.py photo.jpg --model tresnet_l.miil_in1k_448
    python predict.py photo.jpg --model runs/f1/weights             # weights trained on your classes
    python predict.py photo.jpg --weights tresnet_m.miil_in1k.safetensors
    python predict.py street.jpg --model tresnet_l.asl_coco_448 --threshold 0.7   # ASL's COCO model
    python predict.py street.jpg --model tresnet_v2_l.ml_decoder_coco_448          # ML-Decoder's
    python predict.py photo.jpg --model runs/zsl/weights --classes names.txt --class-embeddings vectors.npy

--model takes what eval.py's does: a weights name or directory, a pretrained tag (fetched from
the Hugging Face hub the first time; ASL's are converted from their files first),
hf-hub:OWNER/NAME or an architecture (its default tag). Single-label weights: the five most
probable classes (softmax). Multi-label weights (metadata "multi_label", e.g. ASL's): a sigmoid
per class, and the classes above --threshold (default 0.5), most probable first. Class names:
the weights' own (ASL's checkpoints and training exports carry them), ImageNet's for
1000-class weights, else class indices.

Zero-shot ML-Decoder weights score the classes they are given, seen in training or not:
--classes FILE names them (one a line) and --class-embeddings FILE.npy holds a 300-wide word
vector for each, row i for line i (a float .npy array, e.g. fastText vectors).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np

from tresnet_jax.cli import add_multi_label_argument, command, enable_compilation_cache
from tresnet_jax.data.classes import check_zero_shot_input, class_names, read_zero_shot_classes
from tresnet_jax.data.preprocess import load_image
from tresnet_jax.errors import InputError
from tresnet_jax.factory import load
from tresnet_jax.model.ml_decoder import WORD_DIM
from tresnet_jax.preprocessing import check_image_size
from tresnet_jax.runtime.compile import jit
from tresnet_jax.train.flags import add_settings, given_section

TOP = 5
THRESHOLD = 0.5  # multi-label: a class is predicted when its sigmoid probability is above this


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
    add_settings(parser, ["model.tf32"])
    add_multi_label_argument(parser)
    parser.add_argument(
        "--classes", type=Path, metavar="FILE", help="with --class-embeddings: the classes to score, one name a line"
    )
    parser.add_argument(
        "--class-embeddings",
        type=Path,
        metavar="FILE.npy",
        help=f"zero-shot ML-Decoder weights: one {WORD_DIM}-wide word vector a line of --classes (float .npy array)",
    )
    parser.add_argument(
        "--threshold",
        type=float,
        help=f"multi-label weights only: print the classes whose probability is above this (default {THRESHOLD})",
    )
    args = parser.parse_args(argv)
    args.tf32 = given_section(args, "model").tf32
    if args.image_size is not None:
        check_image_size(args.image_size)
    if args.threshold is not None and not 0.0 < args.threshold < 1.0:
        parser.error(f"--threshold must be between 0 and 1 (exclusive), got {args.threshold:g}")
    if (args.classes is None) != (args.class_embeddings is None):
        parser.error("--classes and --class-embeddings go together: the names of the classes and their word vectors")
    return args


def top_classes(probabilities: np.ndarray, labels: list[str]) -> list[str]:
    """The TOP most probable classes, most probable first."""
    return [f"  {100 * probabilities[i]:6.2f}%  {labels[i]}" for i in np.argsort(-probabilities)[:TOP]]


def above_threshold(probabilities: np.ndarray, labels: list[str], threshold: float) -> list[str]:
    """The classes whose probability is above ``threshold``, most probable first; else one line
    saying none is, with the most probable class."""
    order = np.argsort(-probabilities, kind="stable")
    lines = [f"  {100 * probabilities[i]:6.2f}%  {labels[i]}" for i in order if probabilities[i] > threshold]
    if lines:
        return lines
    best = order[0]
    return [f"  no class above {100 * threshold:g}% (highest: {100 * probabilities[best]:.2f}%  {labels[best]})"]


@command
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    zero_shot = None
    if args.class_embeddings is not None:  # the files read and checked before anything else
        zero_shot = read_zero_shot_classes(args.classes, args.class_embeddings, WORD_DIM)
    enable_compilation_cache()
    architecture = args.model if args.weights else None
    name = args.weights or args.model or "tresnet_m"
    loaded = load(name, architecture=architecture, allow_tf32=args.tf32, multi_label=args.multi_label)
    model, variables, info = loaded.model, loaded.variables, loaded.info
    print(f"weights: {loaded.origin}")
    if model.num_classes == 0:
        raise InputError(f"{info.model} weights without a classifier head cannot predict classes")
    weights_said = f"these weights ({info.model}, {info.head.describe()} head, {info.num_classes} classes)"
    check_zero_shot_input(info.head.zero_shot, zero_shot is not None, weights_said)
    if args.threshold is not None and not info.multi_label:
        raise InputError(
            f"--threshold is for multi-label weights; these ({info.model}, {model.num_classes} classes) "
            f"are single-label: predict.py prints their top {TOP} classes"
        )
    prep = info.preprocessing.replace(input_size=args.image_size)
    images, names, failures = [], [], 0
    for path in args.images:
        try:
            images.append(load_image(path, prep))
            names.append(path)
        except InputError as err:
            print(f"error: {err}", file=sys.stderr)
            failures += 1
    if images:
        embeddings = None if zero_shot is None else zero_shot.embeddings
        logits = jit(model.apply)(variables, np.stack(images), class_embeddings=embeddings)
        probabilities = np.asarray(jax.nn.sigmoid(logits) if info.multi_label else jax.nn.softmax(logits, axis=-1))
        labels = list(zero_shot.names) if zero_shot else class_names(model.num_classes, info.class_names)
        threshold = THRESHOLD if args.threshold is None else args.threshold
        for path, p in zip(names, probabilities, strict=True):
            print(f"{path}:")
            for line in above_threshold(p, labels, threshold) if info.multi_label else top_classes(p, labels):
                print(line)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
