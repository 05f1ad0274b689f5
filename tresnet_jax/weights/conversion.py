"""PyTorch TResNet state_dicts (official or timm layout; an fc or ML-Decoder head) <-> Flax
variables, validated tensor by tensor against the architecture."""

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
from tresnet_jax.model.architecture import FC_HEAD, ML_DECODER, ArchSpec, HeadSpec, variable_shapes
from tresnet_jax.model.registry import ARCHITECTURES, PRETRAINED, UNTAGGED, ModelSpec, PretrainedConfig, resolve
from tresnet_jax.weights.heads import with_classes
from tresnet_jax.weights.info import Reported, Source, WeightsInfo
from tresnet_jax.weights.ml_decoder_layout import HEAD, has_ml_decoder, head_state_dict, read_head
from tresnet_jax.weights.torch_layout import (
    OFFICIAL,
    TIMM,
    LayoutError,
    detect_layout,
    infer_architecture,
    listing,
    official_to_timm,
    same_topology,
    timm_to_official,
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
    head: HeadSpec = FC_HEAD  # the checkpoint's head, read off its tensors

    @property
    def model_name(self) -> str:
        return self.model.name


def identify(state_dict: Mapping[str, np.ndarray], layout: str, ml_decoder: bool = False) -> tuple[ModelSpec, int, str]:
    """(architecture, fc classes, note) for a timm-layout state_dict; LayoutError if not TResNet.
    ``ml_decoder``: the head is ML-Decoder's, whose TResNet-L has the v1 slopes."""
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
    name = "tresnet_l_v2" if layout == OFFICIAL and classes == 196 and not ml_decoder else "tresnet_v2_l"
    other = "tresnet_v2_l" if name == "tresnet_l_v2" else "tresnet_l_v2"
    note = (
        f"the tensors fit both {name} and {other} (only their LeakyReLU slopes differ): "
        f"chose {name}; pass --model {other} for the other"
    )
    return resolve(name), classes, note


def convert_state_dict(raw: Mapping[str, np.ndarray], model: ModelSpec | None = None) -> Converted:
    """Flax variables from a PyTorch state_dict of either layout, its head kept (fc, or
    ML-Decoder's as its tensors say: ``ml_decoder_layout.read_head``); ``model`` None infers the
    variant."""
    layout = detect_layout(raw)
    state_dict = official_to_timm(raw) if layout == OFFICIAL else dict(raw)
    ml_decoder = has_ml_decoder(state_dict)
    body = {k: v for k, v in state_dict.items() if not (ml_decoder and k.startswith(HEAD))}
    inferred, classes, note = identify(state_dict, layout, ml_decoder)
    notes = [note] if note else []
    if model is None:
        model = inferred
    elif not same_topology(model.arch, inferred.arch):
        _to_variables(body, model, classes, inferred)  # names the mismatch
        raise LayoutError(f"--model {model.name} contradicts the checkpoint, which holds {inferred.name}")
    if not ml_decoder:
        return Converted(model, layout, classes, _to_variables(body, model, classes, inferred), notes)
    head = read_head({k: v for k, v in state_dict.items() if k.startswith(HEAD)}, model.arch.num_features)
    flat = traverse_util.flatten_dict(_to_variables(body, model, 0, inferred)) | head.variables
    return Converted(model, layout, head.num_classes, traverse_util.unflatten_dict(flat), notes, head.spec)


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


def variables_to_state_dict(variables: Mapping[str, Any], head_layout: str = TIMM) -> dict[str, np.ndarray]:
    """A timm-layout state_dict (``num_batches_tracked`` included) from Flax variables, which
    ``timm.create_model(name).load_state_dict(sd, strict=True)`` accepts; an ML-Decoder head in
    ``head_layout`` (timm's ``timm.layers.ml_decoder`` names, or the official code's)."""
    out, decoder = {}, {}
    for path, value in traverse_util.flatten_dict(dict(variables)).items():
        if path[1:2] == ("head",) and (path[0] == "constants" or path[2] != "fc"):
            decoder[path] = value
            continue
        value = np.asarray(value, np.float32)
        key = torch_key(path)
        out[key] = np.ascontiguousarray(to_torch_array(path, value))
        if path[-1] == "mean" and path[0] == "batch_stats":
            out[key.replace("running_mean", "num_batches_tracked")] = np.zeros((), np.int64)
    return out | head_state_dict(decoder, head_layout)


def variables_to_official_state_dict(variables: Mapping[str, Any], arch: ArchSpec) -> dict[str, np.ndarray]:
    """The official layout (InPlaceABN body, an ML-Decoder head as ML-Decoder's code names it)
    of a model's variables: what the official code's ``load_state_dict(state['model'],
    strict=True)`` takes, computing what the variables compute (``torch_layout.inplace_abn_scales``:
    scales trained here may be negative or below InPlaceABN's 1e-5)."""
    return timm_to_official(variables_to_state_dict(variables, OFFICIAL), arch)


def choose_config(
    model: ModelSpec, num_classes: int, source: str, tag: str | None = None, head: HeadSpec = FC_HEAD
) -> ModelSpec:
    """The architecture with the pretrained configuration of converted weights with ``head``.

    A published tag only when it is known: ``tag`` when given (``--tag``, a hub repository),
    else a tag named in full in the file path, or the published file of a tag that is not on
    the hub (ASL's ``MS_COCO_TRresNet_L_448_86.6.pth``, its dataset prefix optional; ML-Decoder's
    ``tresnet_m_COCO_224_84_2.pth``); a tag's head must be the weights'. Otherwise an untagged
    single-label configuration (no reported accuracy) whose preprocessing is the model's
    published one for that many classes and that head, at 448 when the file name says ``448``
    (an ML-Decoder's squished, as ML-Decoder's code evaluates): only a tag makes weights
    multi-label (an 80-class checkpoint may be a single-label fine-tune).
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
        if not _same_head(cfg, head):
            raise InputError(
                f"tag {tag} has the head {cfg.head.describe()}, the weights the head {head.describe()}: "
                f"convert without --tag, or with a tag of that head"
            )
        return dataclasses.replace(model, config=cfg)
    candidates = [
        c
        for c in PRETRAINED.values()
        if c.architecture == model.name and c.num_classes == num_classes and _same_head(c, head)
    ]
    named = [c for c in candidates if c.tag in source or _names_published_file(c, source)]
    if named:
        return dataclasses.replace(model, config=max(named, key=lambda c: len(c.tag)))
    at_448 = "448" in Path(source).name
    size = next((c.preprocessing.input_size for c in candidates if (c.preprocessing.input_size == 448) == at_448), None)
    base = resolve(model.name, num_classes).config
    preprocessing = base.preprocessing.replace(input_size=size)
    if head.kind == ML_DECODER:
        preprocessing = preprocessing.replace(crop_pct=1.0, squish=True)
    untagged = dataclasses.replace(
        base, tag=f"{model.name}.{UNTAGGED}", preprocessing=preprocessing, source="none", head=head
    )
    return dataclasses.replace(model, config=untagged)


def _same_head(cfg: PretrainedConfig, head: HeadSpec) -> bool:
    """Whether a configuration's head is ``head``, for its class count (a tag may leave an
    ML-Decoder's K to its default: 100, at most the classes)."""
    return cfg.head.resolved(cfg.num_classes) == head.resolved(cfg.num_classes)


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
    """What converted weights are, their head kept (as the tag declares it, when tagged): the tag
    and its reported figures for published weights, multi-label as the configuration says, the
    checkpoint's class names."""
    cfg = chosen.config
    return WeightsInfo(
        model=converted.model_name,
        num_classes=converted.checkpoint_classes,
        head=cfg.head,
        multi_label=cfg.multi_label,
        class_names=class_names,
        preprocessing=cfg.preprocessing,
        tag=chosen.tag,
        source=Source(source.name, file_sha256(source), converted.layout, converted.checkpoint_classes),
        reported=Reported.of(cfg) if chosen.tag is not None else None,
        notes=tuple(converted.notes),
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )


# What declaring a PyTorch file multi-label means, for every command that converts one.
MULTI_LABEL_HELP = (
    "a PyTorch file's classes are independent (a sigmoid each: trained with ASL's or another multi-label loss); "
    "only a tag says so otherwise"
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
    head (the checkpoint's own, ``torch_io.Checkpoint``, or the user's; a zero-shot head scores
    whatever classes it is given word vectors for: its classes are the names it comes with, else
    1); ``multi_label``: the user says its classes are independent (a sigmoid each), as only a
    tag says otherwise. Errors name the source."""
    try:
        converted = convert_state_dict(state_dict, model)
        if converted.head.zero_shot and class_names:
            converted = dataclasses.replace(converted, checkpoint_classes=len(class_names))
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
    chosen = choose_config(converted.model, converted.checkpoint_classes, str(source), tag, converted.head)
    info = weights_info(converted, chosen, source, class_names)
    if multi_label:
        info = info.replace(multi_label=True)
    variables, info, _ = with_classes(converted.variables, info, num_classes)
    return dataclasses.replace(converted, variables=variables), info
