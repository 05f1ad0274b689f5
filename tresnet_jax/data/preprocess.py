"""The one evaluation preprocessing of TResNet, with PIL (the official eval's library): used by
eval.py, predict.py, training's validation, the notebook and the tests.

Official recipe: shorter side to floor(size / crop_pct) with antialiased bilinear resampling,
centre crop to size (or, for the official 448 weights, a plain resize to size x size: squish),
RGB in [0, 1], no mean/std. The host produces uint8; the division by 255 happens on the device.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from tresnet_jax.errors import InputError, UnreadableImage

INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
STRIDE = 32  # the model's total stride: every image size is a multiple of it
# What PIL raises for bytes it cannot decode: not an image, truncated, corrupt, too large.
PIL_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


def check_image_size(size: int) -> None:
    """The one rule for an input size, applied by every tool before anything is compiled or
    written: a positive multiple of the model's total stride."""
    if size < STRIDE or size % STRIDE:
        raise InputError(f"image size must be a positive multiple of {STRIDE}, got {size}")


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

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Preprocessing:
        return cls(
            int(values["input_size"]),
            float(values["crop_pct"]),
            str(values["interpolation"]),
            bool(values.get("squish", False)),
        )

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "resize_size": self.resize_size, "mean": [0.0] * 3, "std": [1.0] * 3}


def pil_transform(image: Any, prep: Preprocessing) -> np.ndarray:
    """A PIL image -> uint8 (size, size, 3): resize and centre crop as the official eval
    (torchvision's sizes and crop offsets, PIL's antialiased resampling)."""
    filters = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}
    size, width, height = prep.input_size, *image.size
    if prep.squish:
        return np.asarray(image.resize((size, size), filters[prep.interpolation]))
    scale = prep.resize_size / min(width, height)
    if height <= width:
        target = (math.floor(width * scale), prep.resize_size)
    else:
        target = (prep.resize_size, math.floor(height * scale))
    pixels = np.asarray(image.resize(target, filters[prep.interpolation]))
    top, left = round((target[1] - size) / 2), round((target[0] - size) / 2)  # halves to even, as torchvision
    return pixels[top : top + size, left : left + size]


def load_image(path: str | os.PathLike, prep: Preprocessing = Preprocessing()) -> np.ndarray:
    """An image file preprocessed for the model: float32 (size, size, 3) in [0, 1]."""
    try:
        encoded = Path(path).read_bytes()
    except OSError as err:
        raise InputError(f"{path}: {err.strerror}") from None
    return pil_transform(decode_pil(encoded, str(path)), prep).astype(np.float32) / 255.0


def decode_pil(encoded: bytes, name: str) -> Any:
    """An RGB PIL image of encoded bytes (greyscale, palette and CMYK become RGB); InputError
    naming ``name`` when PIL cannot read them."""
    with named_decoding_errors(name), Image.open(io.BytesIO(encoded)) as image:
        image.load()
        # convert() copies even when the mode is already RGB (most JPEGs): 5 % of an image's time.
        return image if image.mode == "RGB" else image.convert("RGB")


@contextlib.contextmanager
def named_decoding_errors(name: str) -> Iterator[None]:
    """PIL's errors for bytes it cannot decode, as an UnreadableImage naming ``name``."""
    try:
        yield
    except PIL_ERRORS as err:
        raise UnreadableImage(name, f"unreadable image ({err})") from None


def padded_rows(labels: np.ndarray, indices: Sequence[int], rows: int) -> dict[str, np.ndarray]:
    """An evaluation batch's host columns padded to ``rows``: labels (zeros below; multi-hot rows
    stay uint8, classes become int32), ``mask`` of the real rows, each row's dataset ``index``
    (-1 below)."""
    n = len(indices)
    labels = labels if labels.ndim == 2 else labels.astype(np.int32)
    return {
        "label": np.concatenate([labels, np.zeros((rows - n, *labels.shape[1:]), labels.dtype)]),
        "mask": np.arange(rows) < n,
        "index": np.concatenate([np.asarray(indices, np.int64), np.full(rows - n, -1, np.int64)]).astype(np.int32),
    }
