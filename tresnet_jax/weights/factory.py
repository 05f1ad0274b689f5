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
from tresnet_jax.model.registry import (
    ARCHITECTURES,
    DOWNLOAD_PAGES,
    PRETRAINED,
    ModelSpec,
    closest,
    default_tag,
    resolve,
)
from tresnet_jax.weights.hub import HUB_PREFIX, HubRepo, pretrained_directory
from tresnet_jax.weights.storage import find, model_spec, read_metadata, read_variables, stored_names, weights_root

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
    if text in PRETRAINED and not PRETRAINED[text].on_hub:
        return WeightsChoice(_converted_file_weights(text), None, f"pretrained {text} from {weights_root() / text}")
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


def _converted_file_weights(tag: str) -> Path:
    """The weights directory of a tag published as a file (ASL's, the official repository's),
    which the converter stores under the tag; InputError in one line saying where the file is
    and how to convert it when it is not there."""
    directory = weights_root() / tag
    if find(directory) is not None:
        return directory
    cfg = PRETRAINED[tag]
    where, page = DOWNLOAD_PAGES[cfg.source]
    file = cfg.file or "FILE"
    raise InputError(
        f"{tag} is not converted here ({directory}) and is not on the Hugging Face hub: download "
        f"{cfg.file or 'its file'} from {where} ({page}), then run "
        f"`python convert/torch_to_flax.py {file} --tag {tag}`"
    )


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
    spec = resolve(name)
    if num_classes is None:  # a tag's own count; an architecture's classifier is ImageNet's
        num_classes = spec.config.num_classes if spec.config.tag == name else 1000
    model = TResNet(spec.arch, num_classes, dtype=dtype, axis_name=axis_name)
    return model, _on_device(random_variables(spec.arch, num_classes, seed))


def load(
    name_or_path: str | os.PathLike, dtype: Any = jnp.float32, axis_name: str | None = None
) -> tuple[TResNet, Variables]:
    """A TResNet with stored or pretrained weights: a weights directory, a name converted or
    trained before, a pretrained tag, ``hf-hub:OWNER/NAME``, or an architecture (its default
    tag). Returns ``(model, variables)``, the variables on the default device; what the weights
    are (source, preprocessing, classes) is in ``load_metadata``."""
    loaded = _read(choose_weights(name_or_path).directory_now(), dtype, axis_name)
    return loaded.model, loaded.variables


def load_metadata(name_or_path: str | os.PathLike) -> dict[str, Any]:
    """The metadata stored beside the weights: model, classes, preprocessing, source."""
    return read_metadata(choose_weights(name_or_path).directory_now())


def _read(directory: Path, dtype: Any, axis_name: str | None, origin: str = "") -> Loaded:
    metadata = read_metadata(directory)
    spec = model_spec(metadata, directory)
    model = TResNet(spec.arch, spec.config.num_classes, dtype=dtype, axis_name=axis_name)
    variables = read_variables(directory)
    expected = variable_shapes(model.arch, model.num_classes)
    found = {path: getattr(leaf, "shape", None) for path, leaf in traverse_util.flatten_dict(variables).items()}
    if found != expected:
        wrong = sorted(set(found.items()) ^ set(expected.items()))[:1]
        where = "/".join(wrong[0][0]) if wrong else "?"
        raise InputError(f"{directory}: variables do not fit {spec.name} (first difference at {where})")
    return Loaded(model, _on_device(variables), metadata, spec, origin or str(directory))


def _on_device(variables: Variables) -> Variables:
    return jax.device_put(variables)


TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")


@dataclasses.dataclass
class Loaded:
    """What ``load_any`` found: the model, its variables, the weights' metadata, what they are
    (architecture, tag, preprocessing: ``spec``), and one line saying where they came from."""

    model: TResNet
    variables: Variables
    metadata: dict[str, Any]
    spec: ModelSpec
    origin: str


def load_any(
    weights: str | os.PathLike, model: ModelSpec | None = None, dtype: Any = jnp.float32, axis_name: str | None = None
) -> Loaded:
    """Weights by anything ``load`` takes or, converted in memory, a PyTorch checkpoint file
    (``.pth``/``.pt``/``.bin``/``.safetensors``; ``model`` then picks the architecture when the
    tensors fit two). For a weights name, ``model`` must agree with them."""
    path = Path(weights).expanduser()
    if path.suffix in TORCH_SUFFIXES:
        from tresnet_jax.weights.conversion import convert_checkpoint
        from tresnet_jax.weights.torch_io import read_checkpoint

        checkpoint = read_checkpoint(path)
        converted, metadata = convert_checkpoint(checkpoint.state_dict, path, model, class_names=checkpoint.class_names)
        spec = model_spec(metadata, path)
        network = TResNet(spec.arch, converted.num_classes, dtype=dtype, axis_name=axis_name)
        return Loaded(network, _on_device(converted.variables), metadata, spec, f"{path}, converted in memory")
    choice = choose_weights(weights)
    loaded = _read(choice.directory_now(), dtype, axis_name, choice.description)
    if model is not None and model.arch != loaded.spec.arch:
        raise InputError(f"{weights}: holds {loaded.spec.name} weights, not {model.name}")
    return loaded


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
