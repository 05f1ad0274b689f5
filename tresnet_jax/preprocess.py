"""The one evaluation preprocessing of TResNet, in TensorFlow ops so tf.data runs it in parallel;
used by eval.py, predict.py, the notebook and the tests (with a PIL twin for ``load_image`` on
machines without TensorFlow).

Official recipe: shorter side to floor(size / crop_pct) with antialiased bilinear resampling,
centre crop to size (or, for the official 448 weights, a plain resize to size x size: squish),
RGB in [0, 1], no mean/std. Rounding to uint8 after the resize, as PIL does, keeps the result
within a fraction of a grey level of the PIL pipeline; JPEGs are decoded with the accurate
integer DCT (PIL's decoder), which is what brings the difference from 0.8/255 to 0.15/255.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from tresnet_jax.errors import InputError

INTERPOLATIONS = ("bilinear", "bicubic", "nearest")


@functools.cache
def tensorflow():
    """TensorFlow, imported on first use and kept off the accelerators (JAX owns them)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")
    return tf


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """How images are brought to the model's input size."""

    input_size: int = 224
    crop_pct: float = 0.875
    interpolation: str = "bilinear"
    squish: bool = False  # resize straight to input_size x input_size, no crop

    def __post_init__(self) -> None:
        if self.input_size <= 0 or self.input_size % 32:
            raise InputError(f"image size must be a positive multiple of 32, got {self.input_size}")
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
            int(values["input_size"]), float(values["crop_pct"]), str(values["interpolation"]),
            bool(values.get("squish", False)),
        )

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "resize_size": self.resize_size, "mean": [0.0] * 3, "std": [1.0] * 3}


def decode_image(encoded):
    """Encoded JPEG/PNG/GIF/BMP bytes -> uint8 (H, W, 3); greyscale and CMYK become RGB."""
    tf = tensorflow()
    return tf.cond(
        tf.io.is_jpeg(encoded),
        lambda: tf.io.decode_jpeg(encoded, channels=3, dct_method="INTEGER_ACCURATE"),
        lambda: tf.ensure_shape(
            tf.io.decode_image(encoded, channels=3, dtype=tf.uint8, expand_animations=False), [None, None, 3]
        ),
    )


def to_uint8(pixels):
    """Float pixel values rounded to the nearest grey level and saturated to uint8 [0, 255]."""
    tf = tensorflow()
    return tf.cast(tf.clip_by_value(tf.round(pixels), 0.0, 255.0), tf.uint8)


def transform(image, prep: Preprocessing):
    """uint8 (H, W, 3) -> uint8 (size, size, 3): resize and centre crop as the official eval."""
    tf = tensorflow()
    size = prep.input_size
    if prep.squish:
        target = tf.constant([size, size])
    else:
        shape = tf.shape(image)[:2]
        height, width = tf.cast(shape[0], tf.float64), tf.cast(shape[1], tf.float64)
        scale = float(prep.resize_size) / tf.minimum(height, width)
        # The shorter side gets exactly resize_size, the longer one is truncated (torchvision).
        target = tf.where(
            height <= width,
            tf.stack([prep.resize_size, tf.cast(tf.floor(width * scale), tf.int32)]),
            tf.stack([tf.cast(tf.floor(height * scale), tf.int32), prep.resize_size]),
        )
    resized = tf.image.resize(image, target, method=prep.interpolation, antialias=True)
    resized = to_uint8(resized)
    if prep.squish:
        return resized
    # Centre crop with torchvision's offsets: round((side - size) / 2), halves to even.
    top = tf.cast(tf.round(tf.cast(target[0] - size, tf.float32) / 2.0), tf.int32)
    left = tf.cast(tf.round(tf.cast(target[1] - size, tf.float32) / 2.0), tf.int32)
    return tf.ensure_shape(resized[top : top + size, left : left + size], [size, size, 3])


def decode_with_fallback(encoded: bytes, name: str) -> np.ndarray:
    """uint8 (H, W, 3) of encoded image bytes: TensorFlow's decoder, else PIL for what
    TensorFlow cannot read (rare formats, odd JPEG colour spaces). InputError when neither can."""
    tf = tensorflow()
    try:
        return decode_image(tf.constant(encoded)).numpy()
    except Exception:  # noqa: BLE001 - try the other decoder; its error is the one reported
        return np.asarray(_pil_image(encoded, name))


def pil_transform(image: Any, prep: Preprocessing) -> np.ndarray:
    """``transform`` with PIL, for machines without TensorFlow: a PIL image -> uint8 (size,
    size, 3). Same sizes and crop offsets; PIL's antialiased resampling (the official eval's)."""
    from PIL import Image

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
    """An image file preprocessed for the model: float32 (size, size, 3) in [0, 1]. TensorFlow's
    ops when TensorFlow is installed (what eval.py runs), else PIL's (within a grey level)."""
    try:
        encoded = Path(path).read_bytes()
    except OSError as err:
        raise InputError(f"{path}: {err.strerror}") from None
    try:
        tf = tensorflow()
    except ImportError:
        image = pil_transform(_pil_image(encoded, str(path)), prep)
    else:
        image = transform(tf.convert_to_tensor(decode_with_fallback(encoded, str(path))), prep).numpy()
    return image.astype(np.float32) / 255.0


def _pil_image(encoded: bytes, name: str) -> Any:
    """An RGB PIL image of encoded bytes; InputError when PIL cannot read them."""
    import io

    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(encoded)) as image:
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as err:
        raise InputError(f"{name}: unreadable image ({err})") from None
