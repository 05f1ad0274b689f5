"""The notebook entry points: a model with fresh, stored or pretrained (hub) weights, by name
(``create_model``, ``load``, ``load_metadata`` and their NNX twins), on ``model`` and ``weights``.

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
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util

from tresnet_jax.errors import InputError
from tresnet_jax.model import nnx_modules
from tresnet_jax.model.architecture import ML_DECODER, HeadSpec, variable_shapes
from tresnet_jax.model.initialization import Seed, random_variables
from tresnet_jax.model.linen import TResNet
from tresnet_jax.model.registry import ARCHITECTURES, DOWNLOAD_PAGES, PRETRAINED, closest, default_tag, resolve
from tresnet_jax.weights.heads import with_classes
from tresnet_jax.weights.hub import HUB_PREFIX, HubRepo, pretrained_directory
from tresnet_jax.weights.info import WeightsInfo
from tresnet_jax.weights.storage import find, read_info, read_variables, stored_names, weights_root

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


@dataclasses.dataclass(frozen=True)
class Loaded:
    """A model with its variables (on the default device), what the weights are (``info``) and
    one line saying where they came from. It stands for the pair ``(model, variables)`` that
    ``create_model`` and ``load`` returned before it: ``model, variables = tresnet_jax.load(...)``
    unpacks it, ``[0]`` and ``[1]`` index it."""

    model: TResNet
    variables: Variables
    info: WeightsInfo
    origin: str

    def _pair(self) -> tuple[TResNet, Variables]:
        return self.model, self.variables

    def __iter__(self) -> Iterator[Any]:
        return iter(self._pair())

    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int) -> Any:
        return self._pair()[index]


TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")


def create_model(
    name: str,
    *,
    pretrained: bool = False,
    checkpoint_path: str | os.PathLike | None = None,
    num_classes: int | None = None,
    dtype: Any = jnp.float32,
    axis_name: str | None = None,
    allow_tf32: bool = False,
    pointwise_as_matmul: bool = False,
    seed: Seed = 0,
    head: str | HeadSpec | None = None,
    num_groups: int | None = None,
    zero_shot: bool = False,
) -> Loaded:
    """A TResNet and its variables, on the default device (timm's ``create_model``, in JAX).

    ``name``: an architecture (``tresnet_m``, ``tresnet_l``, ``tresnet_xl``, ``tresnet_v2_l``,
    ``tresnet_l_v2``) or a pretrained tag; with ``pretrained`` anything ``load`` takes;
    ``checkpoint_path``: weights to start from instead (a weights directory or name, or a
    PyTorch file), which must be of ``name``'s architecture. Otherwise the variables are the
    original's initialisation, drawn on the host (nothing is compiled); ``seed`` (an int or a
    PRNG key) makes them reproducible, and a new head's. ``num_classes``: default 1000 (a
    tag's own count; with weights, theirs); another count with weights gets a new head,
    initialised as the original's, the rest kept. ``dtype`` is the compute precision
    (parameters stay float32); ``axis_name`` names the mapped axis BatchNorm synchronises over
    in training. ``allow_tf32``: float32 at JAX's default precision (TF32 on recent NVIDIA GPUs)
    instead of true float32; ``pointwise_as_matmul``: 1x1 convolutions as matrix products (for
    training on the CPU: ``runtime.xla_options.pointwise_as_matmul_for``). ``head``: the
    classifier, ``"fc"`` or ``"ml_decoder"`` (with ``num_groups`` queries, 100 when None, or
    ``zero_shot``; a ``HeadSpec`` says the same); None: the weights' own, or fc."""
    head_spec = head_choice(head, num_groups, zero_shot)
    numerics = {"allow_tf32": allow_tf32, "pointwise_as_matmul": pointwise_as_matmul}
    options = {"num_classes": num_classes, "dtype": dtype, "axis_name": axis_name, "seed": seed, **numerics}
    options["head"] = head_spec
    if checkpoint_path is not None:
        return load(checkpoint_path, architecture=name.split(".")[0], **options)
    if pretrained:
        return load(name, **options)
    spec = resolve(name)
    if num_classes is None:  # a tag's own count; an architecture's classifier is ImageNet's
        num_classes = spec.config.num_classes if spec.config.tag == name else 1000
    if head_spec is None:
        head_spec = spec.config.head if spec.config.tag == name else HeadSpec()
    info = WeightsInfo(spec.name, num_classes, head_spec, preprocessing=spec.config.preprocessing)
    model = TResNet(spec.arch, num_classes, dtype=dtype, axis_name=axis_name, head_spec=info.head, **numerics)
    variables = random_variables(spec.arch, num_classes, seed, info.head)
    return Loaded(model, _on_device(variables), info, f"fresh {name}")


def head_choice(head: str | HeadSpec | None, num_groups: int | None = None, zero_shot: bool = False) -> HeadSpec | None:
    """The head asked for by name (``fc``, ``ml_decoder``; ``ml-decoder`` taken) and settings,
    or as a ``HeadSpec``; None when none is asked for (the weights' own)."""
    if isinstance(head, HeadSpec):
        if num_groups is not None or zero_shot:
            raise InputError("give num_groups and zero_shot in the HeadSpec, not beside it")
        return head
    if head is None:
        if num_groups is not None or zero_shot:
            head = ML_DECODER
        else:
            return None
    return HeadSpec(str(head).replace("-", "_"), num_groups, zero_shot)  # which refuses an unknown kind


def load(
    name_or_path: str | os.PathLike,
    *,
    architecture: str | None = None,
    num_classes: int | None = None,
    dtype: Any = jnp.float32,
    axis_name: str | None = None,
    allow_tf32: bool = False,
    pointwise_as_matmul: bool = False,
    seed: Seed = 0,
    head: str | HeadSpec | None = None,
    num_groups: int | None = None,
    zero_shot: bool = False,
    multi_label: bool = False,
    class_names: Sequence[str] | None = None,
) -> Loaded:
    """A TResNet with stored or pretrained weights: a weights directory, a name converted or
    trained before, a pretrained tag, ``hf-hub:OWNER/NAME``, an architecture (its default tag),
    or a PyTorch checkpoint file (``.pth``/``.pt``/``.bin``/``.safetensors``, converted in
    memory; ``architecture`` picks the variant when its tensors fit two). ``architecture``
    given, weights of another are refused. ``multi_label`` and ``class_names`` declare what a
    PyTorch file converted here does not say (as the converter's ``--multi-label`` and
    ``--classes``); a weights directory already records them. The other arguments: as
    ``create_model``'s."""
    spec = resolve(architecture) if architecture is not None else None
    path = Path(name_or_path).expanduser()
    if path.suffix in TORCH_SUFFIXES:
        from tresnet_jax.weights.conversion import convert_checkpoint
        from tresnet_jax.weights.torch_io import read_checkpoint

        checkpoint = read_checkpoint(path)
        names = list(class_names) if class_names is not None else checkpoint.class_names
        converted, info = convert_checkpoint(
            checkpoint.state_dict, path, spec, class_names=names, multi_label=multi_label
        )
        variables, origin = converted.variables, f"{path}, converted in memory"
    else:
        choice = choose_weights(name_or_path)
        directory = choice.directory_now()
        info, variables, origin = read_info(directory), read_variables(directory), choice.description
        if (multi_label and not info.multi_label) or class_names is not None:
            raise InputError(
                f"{name_or_path}: multi-label and class names are declared when a PyTorch file is converted; "
                f"these weights record theirs ({'multi' if info.multi_label else 'single'}-label)"
            )
        if spec is not None and spec.arch != info.arch:
            raise InputError(f"{name_or_path}: holds {info.model} weights, not {spec.name}")
        _check_shapes(directory, info, variables)
    head_spec = head_choice(head, num_groups, zero_shot)
    variables, info, _ = with_classes(variables, info, num_classes, seed, head_spec)
    numerics = {"allow_tf32": allow_tf32, "pointwise_as_matmul": pointwise_as_matmul}
    model = TResNet(info.arch, info.num_classes, dtype=dtype, axis_name=axis_name, head_spec=info.head, **numerics)
    return Loaded(model, _on_device(variables), info, origin)


def load_metadata(name_or_path: str | os.PathLike) -> WeightsInfo:
    """What the weights of a name or directory are (``metadata.json``), without reading them."""
    return read_info(choose_weights(name_or_path).directory_now())


def _check_shapes(directory: Path, info: WeightsInfo, variables: Variables) -> None:
    expected = variable_shapes(info.arch, info.num_classes, info.head)
    found = {path: getattr(leaf, "shape", None) for path, leaf in traverse_util.flatten_dict(variables).items()}
    if found != expected:
        wrong = sorted(set(found.items()) ^ set(expected.items()))[:1]
        where = "/".join(wrong[0][0]) if wrong else "?"
        raise InputError(f"{directory}: variables do not fit {info.model} (first difference at {where})")


def _on_device(variables: Variables) -> Variables:
    return jax.device_put(variables)


def fingerprint(variables: Variables) -> str:
    """sha256 of every array of the variables, in path order: which weights were evaluated."""
    import hashlib

    import numpy as np

    digest = hashlib.sha256()
    for path, value in sorted(traverse_util.flatten_dict(dict(variables)).items()):
        digest.update("/".join(path).encode())
        digest.update(np.ascontiguousarray(np.asarray(value, np.float32)).tobytes())
    return digest.hexdigest()


def create_nnx_model(name: str, **options: Any) -> nnx_modules.TResNet:
    """``create_model`` as an NNX module (``tresnet_jax.nnx.create_model``), with its options."""
    loaded = create_model(name, **options)
    return nnx_modules.from_linen_variables(loaded.model, loaded.variables)


def load_nnx(name_or_path: str | os.PathLike, **options: Any) -> nnx_modules.TResNet:
    """``load`` as an NNX module (``tresnet_jax.nnx.load``), with its options."""
    loaded = load(name_or_path, **options)
    return nnx_modules.from_linen_variables(loaded.model, loaded.variables)
