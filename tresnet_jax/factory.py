"""The notebook entry points: a model with fresh or stored weights, by name."""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util

from tresnet_jax.errors import InputError
from tresnet_jax.model import TResNet, variable_shapes
from tresnet_jax.registry import get_arch
from tresnet_jax.storage import read_metadata, read_variables, resolve

Variables = dict[str, Any]


def create_model(
    name: str,
    num_classes: int = 1000,
    dtype: Any = jnp.float32,
    axis_name: str | None = None,
    seed: int | jax.Array = 0,
) -> tuple[TResNet, Variables]:
    """A TResNet and freshly initialised variables (the original's init).

    ``name`` is an architecture (``tresnet_m``, ``tresnet_l``, ``tresnet_xl``, ``tresnet_v2_l``,
    ``tresnet_l_v2``) or a pretrained tag; ``dtype`` is the compute precision (parameters stay
    float32); ``axis_name`` names the mapped axis BatchNorm synchronises over in training.
    """
    model = TResNet(get_arch(name), num_classes, dtype=dtype, axis_name=axis_name)
    key = jax.random.key(seed) if isinstance(seed, int) else seed
    # The shapes do not depend on the image size: initialise on the smallest valid input.
    variables = jax.jit(model.init)(key, jnp.zeros((1, 32, 32, 3), jnp.float32))
    return model, dict(variables)


def load(
    name_or_path: str | os.PathLike, dtype: Any = jnp.float32, axis_name: str | None = None
) -> tuple[TResNet, Variables]:
    """A TResNet with stored weights: a name converted before (``tresnet_m``, found under
    ``tresnet_jax.weights_root()``) or the path of a weights directory. Returns
    ``(model, variables)``; what the weights are (source, preprocessing) is in ``load_metadata``."""
    directory = resolve(name_or_path)
    metadata = read_metadata(directory)
    model = TResNet(get_arch(metadata["model"]), int(metadata["num_classes"]), dtype=dtype, axis_name=axis_name)
    variables = read_variables(directory)
    expected = variable_shapes(model.arch, model.num_classes)
    found = {path: getattr(leaf, "shape", None) for path, leaf in traverse_util.flatten_dict(variables).items()}
    if found != expected:
        wrong = sorted(set(found.items()) ^ set(expected.items()))[:1]
        where = "/".join(wrong[0][0]) if wrong else "?"
        raise InputError(f"{directory}: variables do not fit {metadata['model']} (first difference at {where})")
    return model, variables


def load_metadata(name_or_path: str | os.PathLike) -> dict[str, Any]:
    """The metadata stored beside the weights: model, classes, preprocessing, source."""
    return read_metadata(resolve(name_or_path))
