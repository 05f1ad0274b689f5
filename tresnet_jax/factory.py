"""The notebook entry points: a model with fresh or stored weights, by name."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util

from tresnet_jax.errors import InputError
from tresnet_jax.model import ArchSpec, TResNet, variable_shapes
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
    variables = _initializer(model.arch, num_classes)(key, jnp.zeros((1, 32, 32, 3), jnp.float32))
    return model, dict(variables)


@functools.lru_cache(maxsize=16)
def _initializer(arch: ArchSpec, num_classes: int):
    """The compiled init of an architecture, kept: compiling its random draws takes seconds.
    The variables do not depend on dtype or image size (hence the smallest valid input)."""
    return jax.jit(TResNet(arch, num_classes).init)


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


TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")


def load_any(
    weights: str | os.PathLike, model_name: str | None = None, dtype: Any = jnp.float32, axis_name: str | None = None
) -> tuple[TResNet, Variables, dict[str, Any]]:
    """(model, variables, metadata) from converted weights (a name or directory) or, converted
    in memory, a PyTorch checkpoint file (``.pth``/``.pt``/``.bin``/``.safetensors``)."""
    path = Path(weights).expanduser()
    if path.suffix in TORCH_SUFFIXES:
        from tresnet_jax.conversion import choose_config, convert_state_dict, weights_metadata
        from tresnet_jax.torch_io import read_state_dict

        try:
            converted = convert_state_dict(read_state_dict(path), model_name)
        except InputError as err:
            message = str(err)
            raise InputError(message if message.startswith(str(path)) else f"{path}: {message}") from None
        cfg, guessed = choose_config(converted.model_name, converted.num_classes, str(path), converted.layout)
        metadata = weights_metadata(converted, cfg, path, tag_guessed=guessed)
        model = TResNet(get_arch(converted.model_name), converted.num_classes, dtype=dtype, axis_name=axis_name)
        return model, converted.variables, metadata
    metadata = load_metadata(weights)
    if model_name is not None and get_arch(model_name) != get_arch(metadata["model"]):
        raise InputError(f"{weights}: holds {metadata['model']} weights, not {model_name}")
    model, variables = load(weights, dtype=dtype, axis_name=axis_name)
    return model, variables, metadata


def fingerprint(variables: Variables) -> str:
    """sha256 of every array of the variables, in path order: which weights were evaluated."""
    import hashlib

    import numpy as np

    digest = hashlib.sha256()
    for path, value in sorted(traverse_util.flatten_dict(dict(variables)).items()):
        digest.update("/".join(path).encode())
        digest.update(np.ascontiguousarray(np.asarray(value, np.float32)).tobytes())
    return digest.hexdigest()
