"""Export Flax TResNet weights as a PyTorch checkpoint (timm's layout; ML-Decoder's official one).

    python convert/flax_to_torch.py --help          # installed, the same: tresnet-to-torch --help

The command is ``tresnet_jax.cli.to_torch``; this file runs it from a checkout.
"""

import sys

from tresnet_jax.cli.to_torch import main

if __name__ == "__main__":
    sys.exit(main())
