"""TResNet in JAX/Flax: the model, its variants and published configurations, weights converted
from PyTorch, and the multi-label loss and metric (ASL's asymmetric loss, mAP)."""

from tresnet_jax.errors import InputError
from tresnet_jax.factory import Loaded, create_model, load, load_metadata
from tresnet_jax.metrics import mean_average_precision
from tresnet_jax.model.architecture import ArchSpec, HeadSpec
from tresnet_jax.model.linen import TResNet
from tresnet_jax.model.registry import ARCHITECTURES, PRETRAINED, PretrainedConfig, default_config, list_models
from tresnet_jax.preprocessing import Preprocessing
from tresnet_jax.runtime.compile import jit
from tresnet_jax.train.losses import asymmetric_loss, binary_cross_entropy
from tresnet_jax.weights.info import WeightsInfo
from tresnet_jax.weights.storage import weights_root

__all__ = [
    "ARCHITECTURES",
    "PRETRAINED",
    "ArchSpec",
    "HeadSpec",
    "InputError",
    "Loaded",
    "Preprocessing",
    "PretrainedConfig",
    "TResNet",
    "WeightsInfo",
    "asymmetric_loss",
    "binary_cross_entropy",
    "create_model",
    "default_config",
    "jit",
    "list_models",
    "load",
    "load_metadata",
    "mean_average_precision",
    "weights_root",
]
