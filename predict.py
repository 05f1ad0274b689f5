"""Top-5 classes of images (multi-label weights: the classes above a threshold).

    python predict.py --help          # installed, the same: tresnet-predict --help

The command is ``tresnet_jax.cli.predict``; this file runs it from a checkout.
"""

import sys

from tresnet_jax.cli.predict import main

if __name__ == "__main__":
    sys.exit(main())
