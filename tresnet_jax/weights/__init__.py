"""Weights: PyTorch state_dict layouts and their safe reading and writing, conversion both ways,
the weights directory on disk (``storage``), the Hugging Face hub, and the one rule that turns a
name into a model and its variables (``factory``: ``create_model``, ``load``, ``load_any``).

May import: ``tresnet_jax.model``, ``tresnet_jax.errors``.
"""
