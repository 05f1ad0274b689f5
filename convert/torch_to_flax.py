"""Convert a PyTorch TResNet checkpoint into Flax weights.

    python convert/torch_to_flax.py --help          # installed, the same: tresnet-convert --help

The command is ``tresnet_jax.cli.convert``; this file runs it from a checkout.
"""

import sys

from tresnet_jax.cli.convert import main

if __name__ == "__main__":
    sys.exit(main())
