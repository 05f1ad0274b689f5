"""The notebook entry points: a model with fresh, stored or pretrained (hub) weights, by name.

One rule turns a name into weights, everywhere (``load``, ``create_model(pretrained=True)``,
``eval.py --model``, ``predict.py --model``, ``train.py --init``), in this order: weights
converted or trained under that name (or a weights directory's path); a pretrained tag
(``tresnet_m.miil_in1k``) or hub repository (``hf-hub:timm/<tag>``); an architecture, meaning
timm's default tag for it. Pretrained tags are read from ``weights_root()/<tag>`` when stored
there, else fetched from the Hugging Face hub, converted and stored.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util

from tresnet_jax.errors import InputError
from tresnet_jax.model import nnx
from tresnet_jax.model.architecture import variable_shapes
from tresnet_jax.model.initialization import Seed, random_variables, replace_head
from tresnet_jax.model.linen import TResNet
from tresnet_jax.model.registry import ARCHITECTURES, PRETRAINED, closest, default_tag, get_arch
from tresnet_jax.weights.hub import HUB_PREFIX, HubRepo, pretrained_directory
from tresnet_jax.weights.storage import find, read_metadata, read_variables, stored_names, weights_root

Variables = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class WeightsChoice:
    """Where a name's weights come from: a local weights directory or a hub repository."""

    directory: Path | None
    repo: HubRepo | None
    description: str

    def directory_now(self) -> Path:
        """The weights directory, fetching and converting the hub repository if needed."""
        return self.directory if self.directory is not None else pretrained_directory(self.repo)


def choose_weights(name: str | os.PathLike) -> WeightsChoice:
    """What ``name`` means (module docstring); InputError naming the closest known names."""
    directory = find(name)
    if directory is not None:
        return WeightsChoice(directory, None, f"weights {str(name)!r} from {directory}")
    text = str(name)
    if text.startswith(HUB_PREFIX):
        repo = HubRepo.parse(text)
    elif text in PRETRAINED:
        repo = HubRepo.of_tag(text)
    elif text in ARCHITECTURES:
        tag = default_tag(text)
        if tag is None:
            raise InputError(
                f"{text} has no pretrained weights on the hub (its only published weights are the official "
                f"repository's: convert the .pth with convert/torch_to_flax.py); create_model({text!r}) gives "
                "a fresh model"
            )
        repo = HubRepo.of_tag(tag)
    else:
        known = [*stored_names(), *PRETRAINED, *ARCHITECTURES]
        raise InputError(
            f"no weights {text!r}: not a weights directory, a name under {weights_root()}, a pretrained tag or an "
            f"architecture; closest known: {closest(text, known)}"
        )
    stored = repo.directory
    what = f"pretrained {repo.tag or repo}" + (f" (the default weights of {text})" if text in ARCHITECTURES else "")
    if find(stored) is not None:
        return WeightsChoice(stored, repo, f"{what} from {stored}")
    return WeightsChoice(None, repo, f"{what}, fetched from the Hugging Face hub ({repo}) into {stored}")


def create_model(
    name: str,
    num_classes: int | None = None,
    dtype: Any = jnp.float32,
    axis_name: str | None = None,
    seed: Seed = 0,
    *,
    pretrained: bool = False,
) -> tuple[TResNet, Variables]:
    """A TResNet and its variables, on the default device.

    ``name``: an architecture (``tresnet_m``, ``tresnet_l``, ``tresnet_xl``, ``tresnet_v2_l``,
    ``tresnet_l_v2``) or a pretrained tag; with ``pretrained=True`` also anything ``load``
    takes. Without ``pretrained`` the variables are the original's initialisation, drawn on
    the host (nothing is compiled); ``seed`` (an int or a PRNG key) makes them reproducible.
    ``num_classes``: default 1000 (a tag's own count; with ``pretrained``, the weights'); a
    different count with ``pretrained`` gets a new head, initialised as the original's, and
    keeps the rest. ``dtype`` is the compute precision (parameters stay float32);
    ``axis_name`` names the mapped axis BatchNorm synchronises over in training.
    """
    if pretrained:
        model, variables = load(name, dtype=dtype, axis_name=axis_name)
        if num_classes is None or num_classes == model.num_classes:
            return model, variables
        variables = replace_head(variables, model.arch, num_classes, seed)
        return model.clone(num_classes=num_classes), _on_device(variables)
    arch = get_arch(name)
    if num_classes is None:
        num_classes = PRETRAINED[name].num_classes if name in PRETRAINED else 1000
    model = TResNet(arch, num_classes, dtype=dtype, axis_name=axis_name)
    return model, _on_device(random_variables(arch, num_classes, seed))


def load(
    name_or_path: str | os.PathLike, dtype: Any = jnp.float32, axis_name: str | None = None
) -> tuple[TResNet, Variables]:
    """A TResNet with stored or pretrained weights: a weights directory, a name converted or
    trained before, a pretrained tag, ``hf-hub:OWNER/NAME``, or an architecture (its default
    tag). Returns ``(model, variables)``, the variables on the default device; what the weights
    are (source, preprocessing, classes) is in ``load_metadata``."""
    model, variables, _ = _read(choose_weights(name_or_path).directory_now(), dtype, axis_name)
    return model, variables


def load_metadata(name_or_path: str | os.PathLike) -> dict[str, Any]:
    """The metadata stored beside the weights: model, classes, preprocessing, source."""
    return read_metadata(choose_weights(name_or_path).directory_now())


def _read(directory: Path, dtype: Any, axis_name: str | None) -> tuple[TResNet, Variables, dict[str, Any]]:
    metadata = read_metadata(directory)
    model = TResNet(get_arch(metadata["model"]), int(metadata["num_classes"]), dtype=dtype, axis_name=axis_name)
    variables = read_variables(directory)
    expected = variable_shapes(model.arch, model.num_classes)
    found = {path: getattr(leaf, "shape", None) for path, leaf in traverse_util.flatten_dict(variables).items()}
    if found != expected:
        wrong = sorted(set(found.items()) ^ set(expected.items()))[:1]
        where = "/".join(wrong[0][0]) if wrong else "?"
        raise InputError(f"{directory}: variables do not fit {metadata['model']} (first difference at {where})")
    return model, _on_device(variables), metadata


def _on_device(variables: Variables) -> Variables:
    return jax.device_put(variables)


TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")


@dataclasses.dataclass
class Loaded:
    """What ``load_any`` found: the model, its variables, the weights' metadata, and one line
    saying where they came from."""

    model: TResNet
    variables: Variables
    metadata: dict[str, Any]
    origin: str


def load_any(
    weights: str | os.PathLike, model_name: str | None = None, dtype: Any = jnp.float32, axis_name: str | None = None
) -> Loaded:
    """Weights by anything ``load`` takes or, converted in memory, a PyTorch checkpoint file
    (``.pth``/``.pt``/``.bin``/``.safetensors``; ``model_name`` then picks the architecture
    when the tensors fit two). For a weights name, ``model_name`` must agree with them."""
    path = Path(weights).expanduser()
    if path.suffix in TORCH_SUFFIXES:
        from tresnet_jax.weights.conversion import convert_checkpoint
        from tresnet_jax.weights.torch_io import read_state_dict

        converted, metadata = convert_checkpoint(read_state_dict(path), path, model_name)
        model = TResNet(get_arch(converted.model_name), converted.num_classes, dtype=dtype, axis_name=axis_name)
        return Loaded(model, _on_device(converted.variables), metadata, f"{path}, converted in memory")
    choice = choose_weights(weights)
    model, variables, metadata = _read(choice.directory_now(), dtype, axis_name)
    if model_name is not None and get_arch(model_name) != model.arch:
        raise InputError(f"{weights}: holds {metadata['model']} weights, not {model_name}")
    return Loaded(model, variables, metadata, choice.description)


def fingerprint(variables: Variables) -> str:
    """sha256 of every array of the variables, in path order: which weights were evaluated."""
    import hashlib

    import numpy as np

    digest = hashlib.sha256()
    for path, value in sorted(traverse_util.flatten_dict(dict(variables)).items()):
        digest.update("/".join(path).encode())
        digest.update(np.ascontiguousarray(np.asarray(value, np.float32)).tobytes())
    return digest.hexdigest()


def create_nnx_model(
    name: str,
    *,
    pretrained: bool = False,
    num_classes: int | None = None,
    dtype: Any = jnp.float32,
    seed: Seed = 0,
) -> nnx.TResNet:
    """``create_model`` as an NNX module (``tresnet_jax.nnx.create_model``)."""
    model, variables = create_model(name, num_classes=num_classes, dtype=dtype, seed=seed, pretrained=pretrained)
    return nnx.from_linen_variables(model, variables)


def load_nnx(name_or_path: str | os.PathLike, dtype: Any = jnp.float32) -> nnx.TResNet:
    """``load`` as an NNX module (``tresnet_jax.nnx.load``)."""
    return nnx.from_linen_variables(*load(name_or_path, dtype=dtype))
