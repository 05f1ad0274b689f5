"""The network itself: layers, the architecture's plan (``architecture``), the Linen module
(``linen``), the NNX module (``nnx_modules``), the original's initialisation, and the tables of variants
and published configurations (``registry``).

May import: ``tresnet_jax.errors`` and nothing else of the package. Weights, data and training
build on this, never the reverse.
"""
