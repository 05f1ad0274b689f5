"""Weights: what a set of weights is (``info``: ``WeightsInfo``, the record of metadata.json),
PyTorch state_dict layouts (an ML-Decoder head's: ``ml_decoder_layout``) and their safe reading
and writing, conversion both ways, a new head (``heads``), the weights directory on disk
(``storage``) and the Hugging Face hub. The one rule that turns a name into a model and its
variables stands on this: ``tresnet_jax.factory``.

May import: ``tresnet_jax.model``, ``tresnet_jax.preprocessing``, ``tresnet_jax.errors``.
"""
