"""Export TResNet weights as serialized StableHLO (jax.export), for serving with JAX alone.

    python convert/export_stablehlo.py --help      # installed, the same: tresnet-export-stablehlo --help

The command is ``tresnet_jax.cli.export.stablehlo_main``; this file runs it from a checkout.
"""

import sys

from tresnet_jax.cli.export import stablehlo_main

if __name__ == "__main__":
    sys.exit(stablehlo_main())
