"""Export TResNet weights with the weights baked in, for serving without this package.

    tresnet-export-onnx tresnet_m tresnet_m.onnx                      # onnxruntime, TensorRT
    tresnet-export-onnx tresnet_m.miil_in1k_448 tresnet_m_448_fp16.onnx --precision fp16
    tresnet-export-stablehlo tresnet_m tresnet_m.stablehlo             # JAX alone

(from a checkout: ``python convert/flax_to_onnx.py`` and ``python convert/export_stablehlo.py``.)
WEIGHTS is anything tresnet_jax.load takes: a weights directory, a name converted or trained
before, a pretrained tag, hf-hub:timm/<tag>. H = W = --image-size (default: the weights' input
size); any batch size.

ONNX: the Flax model's own computation translated to opset 17, the weights stored in it:

    input   images   float32 [batch, 3, H, W], NCHW, RGB in [0, 1], no mean/std
    output  logits   float32 [batch, classes]

--precision fp16 computes in float16 where the Flax model does (BatchNorm, pooling and the
logits stay float32); input and output stay float32. Needs the export extra (onnx).

StableHLO: the inference forward lowered for the CPU and CUDA; it needs JAX, not this package:

    forward = jax.export.deserialize(open("tresnet_m.stablehlo", "rb").read())
    logits = forward.call(images)  # float32 [batch, H, W, 3] (NHWC, RGB in [0, 1]) -> [batch, classes]

ML-Decoder weights export as they are. Zero-shot ML-Decoder weights score the classes given at
run time, in both files: a second input, class_embeddings float32 [classes, 300] (a word vector
a class, any number of them), and logits [batch, classes] in its row order:

    logits = forward.call(images, class_embeddings)                 # StableHLO
    session.run(None, {"images": nchw, "class_embeddings": vectors})  # ONNX
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import jax.numpy as jnp

from tresnet_jax.cli import command
from tresnet_jax.export import ONNX_OPSET, STABLEHLO_PLATFORMS, onnx_model, onnx_properties, stablehlo_export
from tresnet_jax.factory import load, load_metadata
from tresnet_jax.model.ml_decoder import WORD_DIM
from tresnet_jax.preprocessing import check_image_size
from tresnet_jax.runtime.precision import canonical, compute_dtype
from tresnet_jax.weights.info import WeightsInfo
from tresnet_jax.weights.storage import check_output_file, write_file_atomically

ONNX_PRECISIONS = ("fp32", "fp16")  # what the ONNX translation computes in


def parse_args(argv: Sequence[str] | None, onnx: bool) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("weights", help="weights directory, stored name, pretrained tag or hf-hub:timm/<tag>")
    parser.add_argument("output", type=Path, help="the .onnx file to write" if onnx else "the file to write")
    parser.add_argument("--image-size", type=int, help="height and width, a multiple of 4 (default: the weights')")
    if onnx:
        parser.add_argument(
            "--precision",
            "--dtype",
            type=canonical,
            choices=ONNX_PRECISIONS,
            default="fp32",
            help="compute precision (float32 and float16 are taken too)",
        )
    parser.add_argument("--force", action="store_true", help="replace an existing output file")
    return parser.parse_args(argv)


def checked(args: argparse.Namespace) -> tuple[WeightsInfo, int]:
    """(what the weights are, image size), every argument checked before any work is done."""
    if args.image_size is not None:
        check_image_size(args.image_size)
    check_output_file(args.output, args.force)
    info = load_metadata(args.weights)
    return info, args.image_size or info.preprocessing.input_size


def write_output(path: Path, data: bytes) -> None:
    """Written beside ``path`` and renamed into place: never half a file."""
    write_file_atomically(path, lambda tmp: Path(tmp).write_bytes(data))


def signature(info: WeightsInfo, images: str, classes: int) -> str:
    """What the file takes and gives, as the message after writing says it."""
    if info.head.zero_shot and classes:
        return f"{images}, class_embeddings float32 [classes, {WORD_DIM}] -> logits [batch, classes]"
    return f"{images} -> logits [batch, {classes}]"


@command
def onnx_main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv, onnx=True)
    info, size = checked(args)
    model, variables = load(args.weights, dtype=compute_dtype(args.precision))
    dtype = jnp.dtype(model.dtype).name
    write_output(
        args.output, onnx_model(model, variables, size, onnx_properties(info, size, dtype)).SerializeToString()
    )
    images = f"images float32 [batch, 3, {size}, {size}] (NCHW, RGB in [0, 1])"
    print(
        f"wrote {args.output}: {info.model}, {dtype}, opset {ONNX_OPSET}; {signature(info, images, model.num_classes)}"
    )
    return 0


@command
def stablehlo_main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv, onnx=False)
    info, size = checked(args)
    model, variables = load(args.weights)
    write_output(args.output, stablehlo_export(model, variables, size))
    images = f"images float32 [batch, {size}, {size}, 3] (NHWC, RGB in [0, 1])"
    platforms = " and ".join(STABLEHLO_PLATFORMS)
    print(f"wrote {args.output}: {info.model}, for {platforms}; {signature(info, images, model.num_classes)}")
    return 0
