"""Evaluate TResNet weights (top-1/top-5, or mAP for multi-label).

    python eval.py --help          # installed, the same: tresnet-eval --help

The command is ``tresnet_jax.cli.eval``; this file runs it from a checkout.
"""

import sys

from tresnet_jax.cli.eval import main

if __name__ == "__main__":
    sys.exit(main())
