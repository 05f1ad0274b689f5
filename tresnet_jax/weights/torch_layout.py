"""PyTorch state_dict layouts of TResNet (official InPlaceABN and timm) and their mapping to
the Flax variable tree.

Everything here works on plain ``{key: numpy array}`` dicts, so it needs no PyTorch.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np

from tresnet_jax.errors import InputError
from tresnet_jax.model.architecture import ArchSpec, stage_plan

INPLACE_ABN_EPS = 1e-5

OFFICIAL, TIMM = "official", "timm"

# Official conv units are Sequential(conv, InPlaceABN); a stride-2 unit wraps that in
# Sequential(unit, blur), hence the extra ``.0``. timm names the two ``conv`` and ``bn``.
_OFFICIAL_TO_TIMM = (
    (re.compile(r"\.(conv\d+)\.0\.0\."), r".\1.conv."),
    (re.compile(r"\.(conv\d+)\.0\.1\."), r".\1.bn."),
    (re.compile(r"\.(conv\d+)\.0\."), r".\1.conv."),
    (re.compile(r"\.(conv\d+)\.1\."), r".\1.bn."),
    (re.compile(r"\.downsample\.(\d+)\.0\."), r".downsample.\1.conv."),
    (re.compile(r"\.downsample\.(\d+)\.1\."), r".downsample.\1.bn."),
)

# Flax leaf name -> PyTorch tensor name, per collection.
_LEAF_TO_TORCH = {
    ("params", "kernel"): "weight",
    ("params", "scale"): "weight",
    ("params", "bias"): "bias",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}


class LayoutError(InputError):
    """A state_dict that is not a TResNet checkpoint we can read, or not the expected one."""


def unwrap_state_dict(obj: object) -> dict[str, object]:
    """The state_dict inside a loaded checkpoint: under ``model`` or ``state_dict`` or bare,
    with any DataParallel ``module.`` prefix removed."""
    for _ in range(2):
        if isinstance(obj, Mapping) and not _looks_like_state_dict(obj):
            for wrapper in ("model", "state_dict", "model_state_dict"):
                if isinstance(obj.get(wrapper), Mapping):
                    obj = obj[wrapper]
                    break
    if not isinstance(obj, Mapping) or not _looks_like_state_dict(obj):
        raise LayoutError("no state_dict found (expected a dict of tensors, or one under 'model' or 'state_dict')")
    return {_strip_prefix(str(k)): v for k, v in obj.items()}


CLASS_NAMES_ENTRY = "idx_to_class"  # ASL's checkpoints: {"model": ..., "idx_to_class": {0: "person", ...}}


def checkpoint_class_names(obj: object) -> list[str] | None:
    """The class names a loaded checkpoint carries beside its state_dict (ASL's ``idx_to_class``,
    class index -> name), in class order; None when it has none. LayoutError unless the indices
    are 0 .. n-1 and the names strings."""
    if not isinstance(obj, Mapping) or CLASS_NAMES_ENTRY not in obj:
        return None
    mapping = obj[CLASS_NAMES_ENTRY]
    if not isinstance(mapping, Mapping):
        raise LayoutError(f"{CLASS_NAMES_ENTRY} is a {type(mapping).__name__}, not a dict of class index to name")
    indices = sorted(k for k in mapping if isinstance(k, int) and not isinstance(k, bool))
    if indices != list(range(len(mapping))):
        found = listing([repr(k) for k in list(mapping)])
        raise LayoutError(f"{CLASS_NAMES_ENTRY} is not indexed 0 to {len(mapping) - 1}: its keys are {found}")
    wrong = [f"{i}: {type(mapping[i]).__name__}" for i in indices if not isinstance(mapping[i], str)]
    if wrong:
        raise LayoutError(f"{CLASS_NAMES_ENTRY} names must be strings; not {listing(wrong)}")
    return [mapping[i] for i in indices]


def _looks_like_state_dict(obj: Mapping) -> bool:
    return any(isinstance(k, str) and (k.endswith(".weight") or k.endswith(".bias")) for k in obj)


def _strip_prefix(key: str) -> str:
    return key[len("module.") :] if key.startswith("module.") else key


def detect_layout(state_dict: Mapping[str, object]) -> str:
    """``official`` (InPlaceABN, Sequential indices) or ``timm``; LayoutError otherwise."""
    if "body.conv1.conv.weight" in state_dict:
        return TIMM
    if "body.conv1.0.weight" in state_dict:
        return OFFICIAL
    raise LayoutError(
        "not a TResNet checkpoint: missing body.conv1.conv.weight (timm layout) or body.conv1.0.weight "
        f"(official layout); unexpected {listing(list(state_dict))}"
    )


def listing(items: list[str], shown: int = 3) -> str:
    """The first few items of a list, and how many more there are."""
    more = f" and {len(items) - shown} more" if len(items) > shown else ""
    return ", ".join(items[:shown]) + more


def official_to_timm(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Rename official keys to timm's and turn InPlaceABN weights into BatchNorm scales.

    InPlaceABN normalises with |weight| + eps, so that is the equivalent BatchNorm weight;
    trained official weights can be negative, which makes this step matter. The fixed blur
    filters (``filt`` buffers of models built with ``remove_aa_jit``) are not learned: dropped.
    """
    out = {}
    for key, value in state_dict.items():
        if key.endswith(".filt"):
            continue
        new = key
        for pattern, repl in _OFFICIAL_TO_TIMM:
            new = pattern.sub(repl, new)
        if new.endswith(".bn.weight"):
            value = np.abs(value) + np.asarray(INPLACE_ABN_EPS, value.dtype)
        out[new] = value
    return out


_TIMM_UNIT = re.compile(r"^(.*\.(?:conv\d+|downsample\.\d+))\.(conv|bn)\.(\w+)$")


def timm_to_official(state_dict: Mapping[str, np.ndarray], arch: ArchSpec) -> dict[str, np.ndarray]:
    """``official_to_timm``'s inverse, for ``arch``: Sequential indices (a unit followed by the
    blur, stride 2, one level deeper), InPlaceABN weights w >= 0 whose |w| + eps is the
    BatchNorm scale, no ``num_batches_tracked``. ``inplace_abn_scales`` makes every scale one
    InPlaceABN holds."""
    blurred = {
        f"body.layer{s}.{i}.{unit.name}"
        for s, blocks in enumerate(stage_plan(arch), start=1)
        for i, block in enumerate(blocks)
        for unit in block.units
        if unit.downsample
    }
    out = {}
    for key, value in inplace_abn_scales(state_dict).items():
        if key.endswith(".num_batches_tracked"):
            continue
        unit = _TIMM_UNIT.match(key)
        if unit is not None:
            name, part, leaf = unit.groups()
            if part == "bn" and leaf == "weight":
                value = value - np.asarray(INPLACE_ABN_EPS, value.dtype)
            key = f"{name}{'.0' if name in blurred else ''}.{0 if part == 'conv' else 1}.{leaf}"
        out[key] = value
    return out


def inplace_abn_scales(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A timm-layout state_dict whose every BatchNorm scale s is at least eps (InPlaceABN's,
    1e-5, which is also its variance epsilon), computing the same function: InPlaceABN scales by
    |w| + eps, so weights trained here may have scales it cannot hold. A negative scale becomes
    |s|, its channel's conv filter and running mean negated (exact: (-x + m) |s| = (x - m) s);
    a smaller one eps, its running variance v raised to (eps / |s|)^2 (v + eps) - eps (the
    same scale over the standard deviation; a zero scale: the largest float32 variance, a
    scale of 5e-25)."""
    eps = INPLACE_ABN_EPS
    out = dict(state_dict)
    for key, value in state_dict.items():
        unit = _TIMM_UNIT.match(key)
        if unit is None or unit.group(2, 3) != ("bn", "weight"):
            continue
        name = unit.group(1)
        scale = np.asarray(value, np.float64)
        negative = scale < 0
        if negative.any():
            sign = np.where(negative, -1.0, 1.0)
            conv, mean = f"{name}.conv.weight", f"{name}.bn.running_mean"
            out[conv] = (out[conv] * sign.reshape(-1, 1, 1, 1)).astype(out[conv].dtype)
            out[mean] = (out[mean] * sign).astype(out[mean].dtype)
        small = np.abs(scale) < eps
        if small.any():
            var = f"{name}.bn.running_var"
            with np.errstate(divide="ignore", over="ignore"):
                raised = (eps / np.abs(scale)) ** 2 * (np.asarray(out[var], np.float64) + eps) - eps
            limit = np.finfo(np.float32).max
            out[var] = np.where(small, np.minimum(raised, limit), out[var]).astype(out[var].dtype)
        out[key] = np.maximum(np.abs(scale), eps).astype(np.asarray(value).dtype)
    return out


def torch_key(path: tuple[str, ...]) -> str:
    """timm key of a Flax variable, given as (collection, module, ..., leaf)."""
    collection, *modules, leaf = path
    return ".".join([*modules, _LEAF_TO_TORCH[(collection, leaf)]])


def to_flax_array(value: np.ndarray, flax_ndim: int) -> np.ndarray:
    """Transpose a PyTorch tensor into the Flax layout: OIHW conv -> HWIO, (out, in[, 1, 1])
    linear or 1x1 conv -> (in, out)."""
    if flax_ndim == 4:
        return np.transpose(value, (2, 3, 1, 0))
    if flax_ndim == 2:
        return value.reshape(value.shape[0], value.shape[1]).T
    return value


def to_torch_array(path: tuple[str, ...], value: np.ndarray) -> np.ndarray:
    """Inverse of ``to_flax_array``; the squeeze-excite fcs are 1x1 convs in PyTorch."""
    if value.ndim == 4:
        return np.transpose(value, (3, 2, 0, 1))
    if value.ndim == 2:
        out = value.T
        return out[:, :, None, None] if path[-2] in ("fc1", "fc2") else out
    return value


def infer_architecture(state_dict: Mapping[str, np.ndarray]) -> tuple[ArchSpec, int]:
    """(architecture numbers, number of classes) read off a timm-layout state_dict.

    Raises LayoutError when the tensors do not describe a TResNet.
    """
    stem = state_dict.get("body.conv1.conv.weight")
    if stem is None or np.ndim(stem) != 4:
        raise LayoutError("not a TResNet checkpoint: no 4-D stem weight body.conv1.conv.weight")
    layers = []
    for stage in range(1, 5):
        pattern = re.compile(rf"^body\.layer{stage}\.(\d+)\.")
        blocks = {int(m.group(1)) for k in state_dict if (m := pattern.match(k))}
        if not blocks:
            raise LayoutError(f"not a TResNet checkpoint: no blocks in stage body.layer{stage}")
        layers.append(max(blocks) + 1)
    planes = int(np.shape(stem)[0])
    v2 = "body.layer1.0.conv3.conv.weight" in state_dict
    head = state_dict.get("head.fc.weight")
    num_classes = 0 if head is None else int(np.shape(head)[0])
    return ArchSpec(layers=tuple(layers), v2=v2, width_factor=planes / 64), num_classes


def same_topology(a: ArchSpec, b: ArchSpec) -> bool:
    """Whether two specs have the same tensors (slopes do not show in a checkpoint)."""
    return a.layers == b.layers and a.v2 == b.v2 and a.planes == b.planes
