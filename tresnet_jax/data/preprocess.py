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
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from tresnet_jax.errors import InputError, UnreadableImage
from tresnet_jax.preprocessing import Preprocessing

if TYPE_CHECKING:
    from tresnet_jax.data.gpu_decode import Box

# What PIL raises for bytes it cannot decode: not an image, truncated, corrupt, too large.
PIL_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


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


def eval_box(size: tuple[int, int], prep: Preprocessing) -> Box:
    """The region of an image of ``size`` (width, height) that ``pil_transform`` keeps: its
    resize of the shorter side to ``resize_size`` then centre crop is PIL's resize of this box
    to input_size x input_size (the same taps); squish: the whole image."""
    width, height = size
    if prep.squish:
        return (0.0, 0.0, float(width), float(height))
    scale = prep.resize_size / min(width, height)
    target = (
        (math.floor(width * scale), prep.resize_size)
        if height <= width
        else (prep.resize_size, math.floor(height * scale))
    )
    crop = prep.input_size
    left, top = round((target[0] - crop) / 2), round((target[1] - crop) / 2)
    x, y = width / target[0], height / target[1]
    return (left * x, top * y, (left + crop) * x, (top + crop) * y)


@dataclasses.dataclass(frozen=True)
class EvalTransform:
    """An evaluation image's host work (``pipeline.ImageWork``): ``pil_transform`` of the
    decoded bytes, or for the GPU decoder the box it keeps (``eval_box``). No random draws."""

    prep: Preprocessing

    @property
    def size(self) -> int:
        return self.prep.input_size

    @property
    def interpolation(self) -> str:
        return self.prep.interpolation

    def row(self, encoded: bytes, name: str, key: tuple[int, int]) -> np.ndarray:
        return pil_transform(decode_pil(encoded, name), self.prep)

    def box(self, size: tuple[int, int], key: tuple[int, int]) -> Box:
        return eval_box(size, self.prep)


def load_image(path: str | os.PathLike, prep: Preprocessing | None = None) -> np.ndarray:
    """An image file preprocessed for the model (``prep``: default 224, crop 0.875, bilinear):
    float32 (size, size, 3) in [0, 1]."""
    try:
        encoded = Path(path).read_bytes()
    except OSError as err:
        raise InputError(f"{path}: {err.strerror}") from None
    return pil_transform(decode_pil(encoded, str(path)), prep or Preprocessing()).astype(np.float32) / 255.0


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
