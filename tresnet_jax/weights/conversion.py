"""PyTorch TResNet state_dicts (official or timm layout) <-> Flax variables, validated tensor by
tensor against the architecture."""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flax import traverse_util

from tresnet_jax.errors import InputError
from tresnet_jax.model.architecture import variable_shapes
from tresnet_jax.model.registry import ARCHITECTURES, PRETRAINED, UNTAGGED, ModelSpec, PretrainedConfig, resolve
from tresnet_jax.weights.heads import with_classes
from tresnet_jax.weights.info import Reported, Source, WeightsInfo
from tresnet_jax.weights.torch_layout import (
    OFFICIAL,
    LayoutError,
    detect_layout,
    infer_architecture,
    listing,
    official_to_timm,
    same_topology,
    to_flax_array,
    to_torch_array,
    torch_key,
)

Variables = dict[str, Any]

# Buffers that carry no learned state.
_IGNORED_SUFFIXES = (".num_batches_tracked", ".filt")


@dataclasses.dataclass
class Converted:
    """The outcome of a conversion: what was found, and the Flax variables (numpy)."""

    model: ModelSpec  # the architecture; the configuration is chosen later (``choose_config``)
    layout: str
    checkpoint_classes: int
    variables: Variables  # the checkpoint's head kept (``weights.heads.with_classes`` gives another)
    notes: list[str]

    @property
    def model_name(self) -> str:
        return self.model.name


def identify(state_dict: Mapping[str, np.ndarray], layout: str) -> tuple[ModelSpec, int, str]:
    """(architecture, classes, note) for a timm-layout state_dict; LayoutError if not TResNet."""
    found, classes = infer_architecture(state_dict)
    names = [name for name, arch in ARCHITECTURES.items() if same_topology(arch, found)]
    if not names:
        raise LayoutError(
            f"not a known TResNet variant: stem width {found.planes}, blocks per stage "
            f"{list(found.layers)}, {'bottlenecks only' if found.v2 else 'basic+bottleneck blocks'}"
        )
    if len(names) == 1:
        return resolve(names[0]), classes, ""
    # The v2 topology: the official TResNet-L-V2 (slopes 1e-6; its only published weights are a
    # 196-class Stanford-Cars model) and the ImageNet-21K TResNet-L (v1 slopes) share tensors.
    name = "tresnet_l_v2" if layout == OFFICIAL and classes == 196 else "tresnet_v2_l"
    other = "tresnet_v2_l" if name == "tresnet_l_v2" else "tresnet_l_v2"
    note = (
        f"the tensors fit both {name} and {other} (only their LeakyReLU slopes differ): "
        f"chose {name}; pass --model {other} for the other"
    )
    return resolve(name), classes, note


def convert_state_dict(raw: Mapping[str, np.ndarray], model: ModelSpec | None = None) -> Converted:
    """Flax variables from a PyTorch state_dict of either layout, its head kept; ``model`` None
    infers the variant."""
    layout = detect_layout(raw)
    state_dict = official_to_timm(raw) if layout == OFFICIAL else dict(raw)
    inferred, classes, note = identify(state_dict, layout)
    notes = [note] if note else []
    if model is None:
        model = inferred
    elif not same_topology(model.arch, inferred.arch):
        _to_variables(state_dict, model, classes, inferred)  # names the mismatch
        raise LayoutError(f"--model {model.name} contradicts the checkpoint, which holds {inferred.name}")
    return Converted(model, layout, classes, _to_variables(state_dict, model, classes, inferred), notes)


def _fit(value: np.ndarray, shape: tuple[int, ...]) -> np.ndarray | None:
    """The tensor in the Flax layout if it has the shape the model needs, else None."""
    ndim = np.ndim(value)
    if len(shape) == 2 and not (ndim == 2 or (ndim == 4 and value.shape[2:] == (1, 1))):
        return None
    if len(shape) != 2 and ndim != len(shape):
        return None
    out = to_flax_array(value, len(shape))
    # A copy: variables must not alias the caller's tensors (a live PyTorch model may change them).
    return np.array(out, np.float32) if out.shape == shape else None


def _to_variables(
    state_dict: Mapping[str, np.ndarray], model: ModelSpec, classes: int, inferred: ModelSpec
) -> Variables:
    """Every Flax variable from its torch tensor, or a LayoutError naming the first missing,
    unexpected and mis-shaped tensors."""
    shapes = variable_shapes(model.arch, classes)
    keys = {path: torch_key(path) for path in shapes}
    expected = set(keys.values())
    flat, missing, mismatched = {}, [], []
    for path, key in keys.items():
        if key not in state_dict:
            missing.append(key)
            continue
        value = _fit(state_dict[key], shapes[path])
        if value is None:
            want = to_torch_array(path, np.zeros(shapes[path], np.float32)).shape
            mismatched.append(f"{key} is {tuple(np.shape(state_dict[key]))}, expected {want}")
        else:
            flat[path] = value
    position = {key: i for i, key in enumerate(state_dict)}  # report in the checkpoint's order
    mismatched.sort(key=lambda text: position[text.split(" ", 1)[0]])
    unexpected = [k for k in state_dict if k not in expected and not k.endswith(_IGNORED_SUFFIXES)]
    problems = [
        f"{label} {listing(items)}"
        for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch:", mismatched))
        if items
    ]
    if problems:
        looks = f" (it looks like {inferred.name})" if inferred.name != model.name else ""
        raise LayoutError(f"checkpoint does not match {model.name}{looks}: " + "; ".join(problems))
    return traverse_util.unflatten_dict(flat)


def variables_to_state_dict(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """A timm-layout state_dict (``num_batches_tracked`` included) from Flax variables, which
    ``timm.create_model(name).load_state_dict(sd, strict=True)`` accepts."""
    out = {}
    for path, value in traverse_util.flatten_dict(dict(variables)).items():
        value = np.asarray(value, np.float32)
        key = torch_key(path)
        out[key] = np.ascontiguousarray(to_torch_array(path, value))
        if path[-1] == "mean" and path[0] == "batch_stats":
            out[key.replace("running_mean", "num_batches_tracked")] = np.zeros((), np.int64)
    return out


def choose_config(model: ModelSpec, num_classes: int, source: str, tag: str | None = None) -> ModelSpec:
    """The architecture with the pretrained configuration of converted weights.

    A published tag only when it is known: ``tag`` when given (``--tag``, a hub repository),
    else a tag named in full in the file path, or the published file of a tag that is not on
    the hub (ASL's ``MS_COCO_TRresNet_L_448_86.6.pth``, its dataset prefix optional). Otherwise
    an untagged single-label configuration (no reported accuracy) whose preprocessing is the
    model's published one for that many classes, at 448 when the file name says ``448``: only
    a tag makes weights multi-label (an 80-class checkpoint may be a single-label fine-tune).
    """
    if tag is not None:
        if tag not in PRETRAINED:
            raise InputError(f"unknown tag {tag!r}; known: {', '.join(PRETRAINED)}")
        cfg = PRETRAINED[tag]
        if cfg.architecture != model.name or cfg.num_classes != num_classes:
            raise InputError(
                f"tag {tag} is a {cfg.num_classes}-class {cfg.architecture}, the weights are a "
                f"{num_classes}-class {model.name}"
            )
        return dataclasses.replace(model, config=cfg)
    candidates = [c for c in PRETRAINED.values() if c.architecture == model.name and c.num_classes == num_classes]
    named = [c for c in candidates if c.tag in source or _names_published_file(c, source)]
    if named:
        return dataclasses.replace(model, config=max(named, key=lambda c: len(c.tag)))
    at_448 = "448" in Path(source).name
    size = next((c.preprocessing.input_size for c in candidates if (c.preprocessing.input_size == 448) == at_448), None)
    base = resolve(model.name, num_classes).config
    preprocessing = base.preprocessing.replace(input_size=size)
    untagged = dataclasses.replace(base, tag=f"{model.name}.{UNTAGGED}", preprocessing=preprocessing, source="none")
    return dataclasses.replace(model, config=untagged)


def _names_published_file(cfg: PretrainedConfig, source: str) -> bool:
    """Whether a file name is a tag's published file (``MS_COCO_TRresNet_L_448_86.6.pth``), or
    that name without its dataset prefix (``TRresNet_L_448_86.6.pth``, as ASL's scripts call it):
    model, size and mAP together, in any case."""
    if cfg.file is None:
        return False
    core = re.search(r"tr?resnet_.*", Path(cfg.file).stem.lower())
    return core is not None and core.group(0) in Path(source).name.lower()


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def weights_info(
    converted: Converted, chosen: ModelSpec, source: Path, class_names: list[str] | None = None
) -> WeightsInfo:
    """What converted weights are, their head kept: the tag and its reported figures for
    published weights, multi-label as the configuration says, the checkpoint's class names."""
    cfg = chosen.config
    return WeightsInfo(
        model=converted.model_name,
        num_classes=converted.checkpoint_classes,
        multi_label=cfg.multi_label,
        class_names=class_names,
        preprocessing=cfg.preprocessing,
        tag=chosen.tag,
        source=Source(source.name, file_sha256(source), converted.layout, converted.checkpoint_classes),
        reported=Reported.of(cfg) if chosen.tag is not None else None,
        notes=tuple(converted.notes),
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )


def convert_checkpoint(
    state_dict: Mapping[str, np.ndarray],
    source: Path,
    model: ModelSpec | None = None,
    num_classes: int | None = None,
    tag: str | None = None,
    class_names: list[str] | None = None,
    multi_label: bool = False,
) -> tuple[Converted, WeightsInfo]:
    """(Converted variables, what they are) of a checkpoint read from ``source``, with a new
    ``num_classes`` head when another count is asked for; ``class_names``: one per class of its
    head (the checkpoint's own, ``torch_io.Checkpoint``, or the user's); ``multi_label``: the
    user says its classes are independent (a sigmoid each), as only a tag says otherwise.
    Errors name the source."""
    try:
        converted = convert_state_dict(state_dict, model)
        if class_names is not None and len(class_names) != converted.checkpoint_classes:
            raise LayoutError(
                f"{len(class_names)} class names (its idx_to_class, or --classes) for a head of "
                f"{converted.checkpoint_classes} classes"
            )
    except InputError as err:
        message = str(err)
        raise InputError(message if message.startswith(str(source)) else f"{source}: {message}") from None
    # The tag describes the checkpoint as published: its preprocessing still applies under a new
    # head (the record then keeps no tag).
    chosen = choose_config(converted.model, converted.checkpoint_classes, str(source), tag)
    info = weights_info(converted, chosen, source, class_names)
    if multi_label:
        info = info.replace(multi_label=True)
    variables, info, _ = with_classes(converted.variables, info, num_classes)
    return dataclasses.replace(converted, variables=variables), info
