"""Train or fine-tune TResNet.

    python train.py --help          # installed, the same: tresnet-train --help

The command is ``tresnet_jax.cli.train``; this file runs it from a checkout.
"""

import sys

from tresnet_jax.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
