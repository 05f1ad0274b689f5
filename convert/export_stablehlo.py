"""Export TResNet weights as serialized StableHLO (jax.export), for serving with JAX alone.

    python convert/export_stablehlo.py tresnet_m tresnet_m.stablehlo
    python convert/export_stablehlo.py tresnet_m.miil_in1k_448 tresnet_m_448.stablehlo

WEIGHTS is anything tresnet_jax.load takes. The file holds the inference forward with the
weights baked in as constants, lowered for the CPU and CUDA; it needs JAX, not this package:

    import jax
    with open("tresnet_m.stablehlo", "rb") as f:
        forward = jax.export.deserialize(f.read())
    logits = forward.call(images)  # float32 [batch, H, W, 3] (NHWC, RGB in [0, 1]) -> float32 [batch, classes]

H = W = --image-size (default: the weights' input size); any batch size; float32 compute.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from tresnet_jax.cli import command
from tresnet_jax.export import (
    STABLEHLO_PLATFORMS,
    add_export_arguments,
    check_export_arguments,
    stablehlo_export,
    write_output,
)
from tresnet_jax.weights.factory import load


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_export_arguments(parser, "the file to write")
    return parser.parse_args(argv)


@command
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    metadata, size = check_export_arguments(args)
    model, variables = load(args.weights)
    write_output(args.output, stablehlo_export(model, variables, size))
    print(
        f"wrote {args.output}: {metadata['model']}, for {' and '.join(STABLEHLO_PLATFORMS)}; "
        f"images float32 [batch, {size}, {size}, 3] (NHWC, RGB in [0, 1]) -> logits [batch, {model.num_classes}]"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
