"""TResNet in JAX/Flax: the model, its variants and published configurations, and weights
converted from PyTorch."""

from tresnet_jax.compile import jit
from tresnet_jax.errors import InputError
from tresnet_jax.factory import create_model, load, load_metadata
from tresnet_jax.model import ArchSpec, TResNet
from tresnet_jax.registry import ARCHITECTURES, PRETRAINED, PretrainedConfig, default_config, list_models
from tresnet_jax.storage import weights_root

__all__ = [
    "ARCHITECTURES",
    "PRETRAINED",
    "ArchSpec",
    "InputError",
    "PretrainedConfig",
    "TResNet",
    "create_model",
    "default_config",
    "jit",
    "list_models",
    "load",
    "load_metadata",
    "weights_root",
]
