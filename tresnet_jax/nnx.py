"""TResNet as a Flax NNX module, with the same names, variables and weights as the Linen model.

    import tresnet_jax.nnx

    model = tresnet_jax.nnx.create_model("tresnet_m", pretrained=True)   # or load("tresnet_m")
    logits = model(images)                                 # float32; eval mode to start with
    maps = model.stage_features(images, out_indices=(1, 2, 3, 4))
    model.train()                                          # batch statistics, running stats updated

``create_model`` and ``load`` take their variables from ``tresnet_jax.create_model`` /
``tresnet_jax.load`` (one registry, converter, hub and storage) and fill a model built
abstractly, so making one compiles and initialises nothing.

Fine-tuning: a step of ``nnx.value_and_grad`` and ``nnx.Optimizer(model, tx, wrt=nnx.Param)``
(``bench/nnx_vs_linen.py``'s ``train_step``), compiled with ``nnx.split`` once and
``nnx.merge`` inside ``jax.jit``, the state donated. It runs as fast as the Linen step; plain
``nnx.jit`` compiles the same program but spends about 0.1 s of Python per call on the ~630
variables of model and optimizer (BENCHMARKS.md, "NNX vs Linen").
"""

from tresnet_jax.factory import create_nnx_model as create_model
from tresnet_jax.factory import load_nnx as load
from tresnet_jax.model.nnx_modules import (
    BatchNorm,
    Block,
    Body,
    Constant,
    Conv,
    ConvNormAct,
    Dense,
    Head,
    MLDecoderHead,
    SqueezeExcite,
    TResNet,
    from_linen_variables,
    to_linen_variables,
)

__all__ = [
    "BatchNorm",
    "Block",
    "Body",
    "Constant",
    "Conv",
    "ConvNormAct",
    "Dense",
    "Head",
    "MLDecoderHead",
    "SqueezeExcite",
    "TResNet",
    "create_model",
    "from_linen_variables",
    "load",
    "to_linen_variables",
]
