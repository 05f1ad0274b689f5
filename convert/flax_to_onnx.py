"""Export TResNet weights as an ONNX model, for onnxruntime and TensorRT.

    python convert/flax_to_onnx.py --help          # installed, the same: tresnet-export-onnx --help

The command is ``tresnet_jax.cli.export.onnx_main``; this file runs it from a checkout.
"""

import sys

from tresnet_jax.cli.export import onnx_main

if __name__ == "__main__":
    sys.exit(onnx_main())
