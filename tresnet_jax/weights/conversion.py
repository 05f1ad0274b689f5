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
from tresnet_jax.model.initialization import replace_head
from tresnet_jax.model.registry import ARCHITECTURES, PRETRAINED, ModelSpec, PretrainedConfig, resolve
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
_HEAD_PREFIX = "head."


@dataclasses.dataclass
class Converted:
    """The outcome of a conversion: what was found, and the Flax variables (numpy)."""

    model: ModelSpec  # the architecture; the configuration is chosen later (``choose_config``)
    layout: str
    checkpoint_classes: int
    num_classes: int
    variables: Variables
    notes: list[str]

    @property
    def model_name(self) -> str:
        return self.model.name

    @property
    def head_replaced(self) -> bool:
        return self.num_classes != self.checkpoint_classes


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


def convert_state_dict(
    raw: Mapping[str, np.ndarray],
    model: ModelSpec | None = None,
    num_classes: int | None = None,
    head_seed: int = 0,
) -> Converted:
    """Flax variables from a PyTorch state_dict of either layout.

    ``model`` None infers the variant; ``num_classes`` None keeps the checkpoint's head, a
    different count replaces it by a freshly initialised one (0: no head).
    """
    layout = detect_layout(raw)
    state_dict = official_to_timm(raw) if layout == OFFICIAL else dict(raw)
    inferred, classes, note = identify(state_dict, layout)
    notes = [note] if note else []
    if model is None:
        model = inferred
    elif not same_topology(model.arch, inferred.arch):
        _to_variables(state_dict, model, classes, inferred, True)  # names the mismatch
        raise LayoutError(f"--model {model.name} contradicts the checkpoint, which holds {inferred.name}")
    num_classes = classes if num_classes is None else num_classes
    variables = _to_variables(state_dict, model, classes, inferred, keep_head=num_classes == classes)
    if num_classes != classes:
        variables = replace_head(variables, model.arch, num_classes, head_seed)
        notes.append(
            f"replaced the checkpoint's {classes}-class head by a new {num_classes}-class one (seed {head_seed})"
            if num_classes
            else f"dropped the checkpoint's {classes}-class head: the model outputs pooled features"
        )
    return Converted(model, layout, classes, num_classes, variables, notes)


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
    state_dict: Mapping[str, np.ndarray], model: ModelSpec, classes: int, inferred: ModelSpec, keep_head: bool
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
        elif keep_head or not key.startswith(_HEAD_PREFIX):
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
    size = next((c.input_size for c in candidates if (c.input_size == 448) == at_448), None)
    base = resolve(model.name, num_classes).config
    size = size or base.input_size
    untagged = dataclasses.replace(base, tag=f"{model.name}.untagged", input_size=size, source="none")
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


def reported_accuracy(cfg: PretrainedConfig) -> dict[str, Any]:
    """The ``reported`` record of a published tag: the mAP its authors report and the dataset
    (TFDS name) it was measured on for a multi-label model, else timm's ImageNet figures."""
    if cfg.multi_label:
        return {"mAP": cfg.mean_ap, "dataset": cfg.dataset}
    return {"top1": cfg.top1, "top5": cfg.top5, "imagenet_v2_top1": cfg.imagenet_v2_top1}


def weights_metadata(
    converted: Converted, chosen: ModelSpec, source: Path, class_names: list[str] | None = None
) -> dict[str, Any]:
    """What ``metadata.json`` records about converted weights: the tag and its reported accuracy
    only for published weights with their own head; ``multi_label`` (sigmoid per class) as the
    configuration says; the checkpoint's class names while its head is kept."""
    cfg = chosen.config
    published = chosen.tag is not None and not converted.head_replaced
    return {
        "model": converted.model_name,
        "num_classes": converted.num_classes,
        "tag": cfg.tag if published else None,
        "multi_label": cfg.multi_label,
        "class_names": None if converted.head_replaced else class_names,
        "preprocessing": chosen.preprocessing(),
        "reported": reported_accuracy(cfg) if published else None,
        "source": {
            "file": source.name,
            "sha256": file_sha256(source),
            "layout": converted.layout,
            "num_classes": converted.checkpoint_classes,
        },
        "notes": converted.notes,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def convert_checkpoint(
    state_dict: Mapping[str, np.ndarray],
    source: Path,
    model: ModelSpec | None = None,
    num_classes: int | None = None,
    tag: str | None = None,
    class_names: list[str] | None = None,
) -> tuple[Converted, dict[str, Any]]:
    """(Converted variables, their ``metadata.json``) of a checkpoint read from ``source``;
    ``class_names``: the checkpoint's own (``torch_io.Checkpoint``), one per class of its head.
    Errors name the source."""
    try:
        converted = convert_state_dict(state_dict, model, num_classes)
        if class_names is not None and len(class_names) != converted.checkpoint_classes:
            raise LayoutError(
                f"its idx_to_class names {len(class_names)} classes, its head has {converted.checkpoint_classes}"
            )
    except InputError as err:
        message = str(err)
        raise InputError(message if message.startswith(str(source)) else f"{source}: {message}") from None
    if class_names is not None and converted.head_replaced:
        converted.notes.append(f"dropped the checkpoint's {len(class_names)} class names with its head")
    # The tag describes the checkpoint as published: its preprocessing still applies under a new
    # head (the metadata then records no tag).
    chosen = choose_config(converted.model, converted.checkpoint_classes, str(source), tag)
    return converted, weights_metadata(converted, chosen, source, class_names)
