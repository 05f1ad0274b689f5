"""Export TResNet weights as an ONNX model, for onnxruntime and TensorRT.

    python convert/flax_to_onnx.py tresnet_m tresnet_m.onnx
    python convert/flax_to_onnx.py tresnet_m.miil_in1k_448 tresnet_m_448_fp16.onnx --dtype float16

WEIGHTS is anything tresnet_jax.load takes: a weights directory, a name converted or trained
before, a pretrained tag, hf-hub:timm/<tag>. The file is the Flax model's own computation,
translated to ONNX opset 17, the weights stored in it:

    input   images   float32 [batch, 3, H, W], NCHW, RGB in [0, 1], no mean/std; any batch
    output  logits   float32 [batch, classes]

H = W = --image-size (default: the weights' input size). --dtype float16 computes in float16
where the Flax model does (BatchNorm, pooling and the logits stay float32); input and output
stay float32. Needs the export extra (onnx).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import jax.numpy as jnp

from tresnet_jax.cli import command
from tresnet_jax.export import (
    ONNX_OPSET,
    add_export_arguments,
    check_export_arguments,
    onnx_model,
    onnx_properties,
    write_output,
)
from tresnet_jax.weights.factory import load


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_export_arguments(parser, "the .onnx file to write")
    parser.add_argument("--dtype", choices=("float32", "float16"), default="float32", help="compute precision")
    return parser.parse_args(argv)


@command
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    metadata, size = check_export_arguments(args)
    model, variables = load(args.weights, dtype=jnp.dtype(args.dtype))
    proto = onnx_model(model, variables, size, onnx_properties(metadata, size, args.dtype))
    write_output(args.output, proto.SerializeToString())
    print(
        f"wrote {args.output}: {metadata['model']}, {args.dtype}, opset {ONNX_OPSET}; "
        f"images float32 [batch, 3, {size}, {size}] (NCHW, RGB in [0, 1]) -> logits [batch, {model.num_classes}]"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
