"""How images are brought to a model's input: the one record of it (``Preprocessing``), held by
the published configurations (``model.registry``), the weights' metadata (``weights.info``) and
the evaluation pipeline (``data.preprocess`` does the pixels), and the one rule for an input size.

Official recipe: shorter side to floor(size / crop_pct) with antialiased resampling, centre crop
to size (or a plain resize to size x size: squish), RGB in [0, 1], no mean/std normalisation
(TResNet was trained without it; the metadata records mean 0 and std 1 for tools that ask)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from tresnet_jax.errors import InputError

INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
# An image side is a multiple of the stem's 4x4 space-to-depth block; the stages after it round
# odd sides up (anti-aliased downsampling and the shortcut's pooling, as timm and the original
# do): 368 is as valid as 384.
SIZE_STEP = 4


def valid_image_size(size: object) -> bool:
    return isinstance(size, int) and not isinstance(size, bool) and size >= SIZE_STEP and size % SIZE_STEP == 0


def check_image_size(size: int) -> None:
    """The one rule for an input size, applied by every tool before anything is compiled or
    written: a positive multiple of ``SIZE_STEP``."""
    if not valid_image_size(size):
        raise InputError(f"image size must be a positive multiple of {SIZE_STEP}, got {size}")


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """How images are brought to the model's input size."""

    input_size: int = 224
    crop_pct: float = 0.875
    interpolation: str = "bilinear"
    squish: bool = False  # resize straight to input_size x input_size, no crop

    def __post_init__(self) -> None:
        check_image_size(self.input_size)
        if not 0.0 < self.crop_pct <= 1.0:
            raise InputError(f"crop fraction must be in (0, 1], got {self.crop_pct}")
        if self.interpolation not in INTERPOLATIONS:
            raise InputError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {self.interpolation!r}")

    @property
    def resize_size(self) -> int:
        """The shorter side before the centre crop (256 for 224 at 0.875)."""
        return math.floor(self.input_size / self.crop_pct + 1e-6)

    def replace(self, **changes: Any) -> Preprocessing:
        """A copy with the values in ``changes`` that are not None (a command line's overrides)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def to_json(self) -> dict[str, Any]:
        """The metadata record: the settings, the resize size, and mean 0 / std 1."""
        return {**dataclasses.asdict(self), "resize_size": self.resize_size, "mean": [0.0] * 3, "std": [1.0] * 3}

    @classmethod
    def from_json(cls, record: Mapping[str, Any]) -> Preprocessing:
        """From a metadata record, whatever wrote it: a missing value is the default (the
        earliest records lack ``squish``: resize and centre crop), the derived ``resize_size``,
        ``mean`` and ``std`` are not read; a value of the wrong type is an InputError."""
        defaults = cls()
        values = {}
        for field, kind in (("input_size", "whole number"), ("crop_pct", "number"), ("interpolation", "string"),
                            ("squish", "true/false")):  # fmt: skip
            value = record.get(field, getattr(defaults, field))
            if not _is_a(value, kind):
                raise InputError(f"preprocessing {field} {value!r} is not a {kind}")
            values[field] = float(value) if kind == "number" else value
        return cls(**values)


def _is_a(value: object, kind: str) -> bool:
    if kind == "true/false":
        return isinstance(value, bool)
    if kind == "string":
        return isinstance(value, str)
    number = isinstance(value, int | float) and not isinstance(value, bool)
    return number and (kind == "number" or isinstance(value, int))
