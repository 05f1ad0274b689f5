"""Training augmentation of TResNet with PIL and NumPy, run per image on the host's threads or
processes (``host_pool.ordered_map``; PIL releases the GIL while it decodes, resizes and transforms).

The recipe: inception crop (a random box of ``crop_scale`` of the area with a log-uniform aspect
ratio in ``crop_ratio``, resized to the input size with antialiased bilinear resampling),
horizontal flip, RandAugment (``randaugment_ops`` of 14 operations at ``randaugment_magnitude``,
each with a random sign where it has one), Cutout (a square of ``cutout`` x the side, one random
grey level). Mixup/cutmix are applied on the devices (training.py).

Seeding: every random number of an image comes from ``np.random.default_rng(seed)`` with
``seed = (run seed, epoch, image index)``, so an image's augmentation depends on nothing else:
not the thread, the process, the order of work or a resume. The crop, the flip and the cutout
always draw the same count of numbers, first, and RandAugment last, so switching a stage off
leaves the other stages' draws as they were.

Speed: the crop box is drawn from the size in the file's header, before decoding. When the box
is at least twice the output in both directions, a JPEG is decoded at 1/2, 1/4 or 1/8 scale in
the DCT (``Image.draft``), nearly free, and the resize starts from 4-64x fewer pixels. The
RandAugment operations run on the resized image. The Python between PIL's calls holds the GIL
(a few hundred microseconds an image: PIL's header parsing, ImageOps' tables), which bounds how
many threads help; bench/input_pipeline.py measures it.
"""

from __future__ import annotations

import dataclasses
import io
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from tresnet_jax.data.preprocess import named_decoding_errors

GREY = (128, 128, 128)  # what the geometric operations fill uncovered pixels with
MAX_MAGNITUDE = 10.0
CROP_ATTEMPTS = 10
JPEG_SCALES = (8, 4, 2)  # the reductions libjpeg performs in the DCT
Box = tuple[int, int, int, int]  # left, top, right, bottom in pixels


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """What happens to a training image."""

    image_size: int = 224
    squish: bool = False  # the whole image resized to image_size x image_size instead of a random crop (ASL)
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    randaugment_ops: int = 2  # 0 disables RandAugment
    randaugment_magnitude: float = 9.0  # 0..10
    cutout: float = 0.5  # side of the erased square as a fraction of the image side; 0 disables


def train_transform(encoded: bytes, seed: tuple[int, ...], cfg: AugmentConfig, name: str = "image") -> np.ndarray:
    """Encoded image bytes -> augmented uint8 (image_size, image_size, 3), drawn from ``seed``
    alone; InputError naming ``name`` when the bytes are not a readable image."""
    rng = np.random.default_rng(seed)
    image = decode_crop(encoded, name, rng, cfg)
    flip, *cutout_draws = rng.random(4).tolist()
    if cfg.flip and flip < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if cfg.randaugment_ops:
        image = randaugment(image, rng, cfg.randaugment_ops, cfg.randaugment_magnitude)
    pixels = np.array(image)
    if cfg.cutout:
        cutout(pixels, cutout_draws, cfg.cutout)
    return pixels


def crop_box(
    size: tuple[int, int], rng: np.random.Generator, scale: tuple[float, float], ratio: tuple[float, float]
) -> Box:
    """torchvision's RandomResizedCrop box for an image of ``size`` (width, height): the first of
    10 random boxes (area fraction uniform in ``scale``, aspect ratio log-uniform in ``ratio``)
    that fits in the image, else a centre crop of the closest allowed aspect ratio. Always draws
    40 numbers, in one call: Python floats from there on cost 4 us where NumPy's small-array
    operations cost 26 (with the GIL held)."""
    width, height = size
    areas, aspects, lefts, tops = rng.random((4, CROP_ATTEMPTS)).tolist()
    low, high = math.log(ratio[0]), math.log(ratio[1])
    for area_u, aspect_u, left_u, top_u in zip(areas, aspects, lefts, tops, strict=True):
        area = width * height * (scale[0] + (scale[1] - scale[0]) * area_u)
        aspect = math.exp(low + (high - low) * aspect_u)
        w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < w <= width and 0 < h <= height:
            left, top = int(left_u * (width - w + 1)), int(top_u * (height - h + 1))
            return left, top, left + w, top + h
    if width / height < ratio[0]:
        w, h = width, max(1, round(width / ratio[0]))
    elif width / height > ratio[1]:
        w, h = max(1, round(height * ratio[1])), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def decode_crop(
    encoded: bytes, name: str, rng: np.random.Generator, cfg: AugmentConfig, draft: bool = True
) -> Image.Image:
    """The inception crop (``cfg.squish``: the whole image) of encoded bytes as an RGB PIL image
    of cfg.image_size, decoding a JPEG at reduced scale where the box allows it (``draft=False``:
    always at full scale, exact). The crop's numbers are drawn either way."""
    with named_decoding_errors(name):
        image = Image.open(io.BytesIO(encoded))
        box = crop_box(image.size, rng, cfg.crop_scale, cfg.crop_ratio)
        if cfg.squish:
            box = (0, 0, *image.size)
        reduction = 1
        if draft:
            reduction = _draft(image, box, cfg.image_size)
        image.load()
        if image.mode != "RGB":  # convert() copies even when the mode is already right
            image = image.convert("RGB")
    # DCT scaling maps full-scale pixel x to x / reduction exactly (blocks of reduction pixels),
    # and a box inside the full image stays inside the reduced one.
    scaled = tuple(v / reduction for v in box)
    return image.resize((cfg.image_size, cfg.image_size), Image.Resampling.BILINEAR, box=scaled)


def _draft(image: Image.Image, box: Box, out: int) -> int:
    """Ask a JPEG decoder for the largest reduction that keeps the box at least ``out`` pixels on
    both sides, and return the reduction it will apply (1 for other formats)."""
    most = min(box[2] - box[0], box[3] - box[1]) // out
    scale = next((s for s in JPEG_SCALES if s <= most), 1)
    if scale == 1:
        return 1
    width, height = image.size
    # draft picks the largest of 8, 4, 2 not above min(width // w, height // h), which is
    # ``scale`` for this request; the reduction is read back from what draft reports anyway.
    drafted = image.draft("RGB", (width // scale, height // scale))
    return 1 if drafted is None else round(width / drafted[1][2])


def cutout(pixels: np.ndarray, draws: Sequence[float], fraction: float) -> None:
    """Erase, in place, a square of side ``fraction`` x the shorter side centred at a uniformly
    random pixel (clipped at the borders) with one grey level; ``draws``: 3 numbers in [0, 1)."""
    height, width = pixels.shape[:2]
    side = int(min(height, width) * fraction)
    top = int(draws[0] * height) - side // 2
    left = int(draws[1] * width) - side // 2
    pixels[max(top, 0) : max(top + side, 0), max(left, 0) : max(left + side, 0)] = int(draws[2] * 256)


# --- RandAugment -----------------------------------------------------------------------------
# Each operation takes (RGB image, level in [0, 1], sign +-1) and returns an RGB image of the
# same size; the sign only matters to the symmetric ones.
Operation = Callable[[Image.Image, float, float], Image.Image]


def _enhance(enhancer: Callable[[Image.Image], Any]) -> Operation:
    """PIL's blend with a degenerate image (grey, mean grey, black, smoothed): factor 1 +- 0.9 level."""
    return lambda image, level, sign: enhancer(image).enhance(1.0 + sign * 0.9 * level)


def _affine(image: Image.Image, matrix: tuple[float, ...], resample: Image.Resampling) -> Image.Image:
    """Output pixel (x, y) takes input pixel (a x + b y + c, d x + e y + f); grey outside."""
    return image.transform(image.size, Image.Transform.AFFINE, matrix, resample, fillcolor=GREY)


def _rotate(image: Image.Image, level: float, sign: float) -> Image.Image:
    return image.rotate(sign * 30.0 * level, Image.Resampling.BILINEAR, fillcolor=GREY)


def _shear_x(image: Image.Image, level: float, sign: float) -> Image.Image:
    return _affine(image, (1.0, sign * 0.3 * level, 0.0, 0.0, 1.0, 0.0), Image.Resampling.BILINEAR)


def _shear_y(image: Image.Image, level: float, sign: float) -> Image.Image:
    return _affine(image, (1.0, 0.0, 0.0, sign * 0.3 * level, 1.0, 0.0), Image.Resampling.BILINEAR)


def _translate_x(image: Image.Image, level: float, sign: float) -> Image.Image:
    """A shift of 0.45 level of the width, rounded to whole pixels: nearest is then exact (equal
    to bilinear), and 30x cheaper (0.03 ms instead of 1.1 at 224 px)."""
    shift = round(sign * 0.45 * level * image.width)
    return _affine(image, (1.0, 0.0, shift, 0.0, 1.0, 0.0), Image.Resampling.NEAREST)


def _translate_y(image: Image.Image, level: float, sign: float) -> Image.Image:
    shift = round(sign * 0.45 * level * image.height)
    return _affine(image, (1.0, 0.0, 0.0, 0.0, 1.0, shift), Image.Resampling.NEAREST)


def _auto_contrast(image: Image.Image, level: float, sign: float) -> Image.Image:
    return ImageOps.autocontrast(image)


def _equalize(image: Image.Image, level: float, sign: float) -> Image.Image:
    return ImageOps.equalize(image)


def _posterize(image: Image.Image, level: float, sign: float) -> Image.Image:
    """Keep the top 8 - 4 level bits of every channel."""
    return ImageOps.posterize(image, 8 - round(4 * level))


def _solarize(image: Image.Image, level: float, sign: float) -> Image.Image:
    """Invert the values at or above 256 (1 - level)."""
    return ImageOps.solarize(image, 256.0 - 256.0 * level)


def _solarize_add(image: Image.Image, level: float, sign: float) -> Image.Image:
    """Add 110 level to the values below 128, saturating."""
    added = int(110 * level)
    return image.point([min(v + added, 255) if v < 128 else v for v in range(256)] * 3)


RANDAUGMENT_OPS: tuple[tuple[str, Operation], ...] = (
    ("auto_contrast", _auto_contrast),
    ("equalize", _equalize),
    ("rotate", _rotate),
    ("solarize", _solarize),
    ("color", _enhance(ImageEnhance.Color)),
    ("posterize", _posterize),
    ("contrast", _enhance(ImageEnhance.Contrast)),
    ("brightness", _enhance(ImageEnhance.Brightness)),
    ("sharpness", _enhance(ImageEnhance.Sharpness)),
    ("shear_x", _shear_x),
    ("shear_y", _shear_y),
    ("translate_x", _translate_x),
    ("translate_y", _translate_y),
    ("solarize_add", _solarize_add),
)


def randaugment(image: Image.Image, rng: np.random.Generator, num_ops: int, magnitude: float) -> Image.Image:
    """Apply ``num_ops`` operations chosen uniformly at random (with replacement), each at
    ``magnitude`` (0-10) and a random sign."""
    level = magnitude / MAX_MAGNITUDE
    draws = rng.random((num_ops, 2)).tolist()  # one call: each of NumPy's costs microseconds
    for choice, sign in draws:
        image = RANDAUGMENT_OPS[int(choice * len(RANDAUGMENT_OPS))][1](image, level, -1.0 if sign < 0.5 else 1.0)
    return image
