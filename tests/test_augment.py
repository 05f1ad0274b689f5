"""The PIL/NumPy training augmentation: shapes for any input, determinism from the seed alone,
each RandAugment operation, flip, cutout, the crop sampler and the reduced JPEG decode."""

import dataclasses
import io

import numpy as np
import pytest
from PIL import Image

from tests.images import generated
from tresnet_jax.data.augment import RANDAUGMENT_OPS, AugmentConfig, crop_box, cutout, decode_crop, train_transform
from tresnet_jax.data.host_pool import ordered_map
from tresnet_jax.errors import InputError

DEFAULT = AugmentConfig()
PLAIN = AugmentConfig(flip=False, randaugment_ops=0, cutout=0.0)  # the crop alone


def encode(pixels: np.ndarray, fmt: str = "JPEG", mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    image = Image.fromarray(pixels).convert(mode)
    image.save(buffer, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue()


@pytest.fixture(scope="module")
def photo() -> bytes:
    return encode(generated(0, 375, 500))


@pytest.mark.parametrize(
    ("height", "width", "fmt", "mode"),
    [
        (375, 500, "JPEG", "RGB"),
        (333, 517, "PNG", "RGB"),
        (5, 7, "JPEG", "RGB"),  # far smaller than the output
        (1, 1, "PNG", "RGB"),
        (13, 900, "JPEG", "RGB"),  # extreme aspect ratios: the centre-crop fallback
        (900, 13, "PNG", "RGB"),
        (1200, 1601, "JPEG", "RGB"),  # decoded at reduced scale for most crops
        (241, 199, "JPEG", "L"),
        (241, 199, "JPEG", "CMYK"),
        (120, 97, "PNG", "RGBA"),
        (120, 97, "PNG", "P"),
    ],
)
def test_any_image_gives_the_input_shape(height, width, fmt, mode):
    encoded = encode(generated(1, height, width), fmt, mode)
    for seed in range(3):
        image = train_transform(encoded, (0, 0, seed), DEFAULT)
        assert image.shape == (224, 224, 3)
        assert image.dtype == np.uint8
    small = train_transform(encoded, (0, 0, 0), dataclasses.replace(DEFAULT, image_size=96))
    assert small.shape == (96, 96, 3)


def test_the_seed_alone_decides(photo):
    first = train_transform(photo, (7, 1, 42), DEFAULT)
    np.testing.assert_array_equal(first, train_transform(photo, (7, 1, 42), DEFAULT))
    for other in [(7, 1, 43), (7, 2, 42), (8, 1, 42)]:
        assert not np.array_equal(first, train_transform(photo, other, DEFAULT))


def test_threads_give_what_a_loop_gives(photo):
    seeds = [(3, 0, i) for i in range(32)]
    looped = [train_transform(photo, seed, DEFAULT) for seed in seeds]
    threaded = list(ordered_map(lambda seed: train_transform(photo, seed, DEFAULT), seeds, workers=8))
    assert all(outcome.error is None for outcome in threaded)
    for expected, outcome in zip(looped, threaded, strict=True):
        np.testing.assert_array_equal(outcome.value, expected)


@pytest.mark.parametrize("name", [name for name, _ in RANDAUGMENT_OPS])
def test_every_randaugment_operation_changes_the_image(name):
    op = dict(RANDAUGMENT_OPS)[name]
    # Values in 40..200, textured: auto_contrast, equalize and solarize all have work to do.
    pixels = (40 + 0.63 * generated(2, 224, 224)).astype(np.uint8)
    image = Image.fromarray(pixels)
    for sign in (-1.0, 1.0):
        out = op(image, 0.9, sign)
        assert out.mode == "RGB"
        assert out.size == image.size
        assert not np.array_equal(np.asarray(out), pixels), f"{name} with sign {sign} left the image as it was"
    np.testing.assert_array_equal(np.asarray(image), pixels)  # the input is not modified


def test_flip_mirrors_the_same_crop(photo):
    flip_only = dataclasses.replace(PLAIN, flip=True)
    flipped = 0
    for seed in range(12):
        plain = train_transform(photo, (0, 0, seed), PLAIN)
        maybe = train_transform(photo, (0, 0, seed), flip_only)
        if not np.array_equal(plain, maybe):
            np.testing.assert_array_equal(maybe, np.fliplr(plain))
            flipped += 1
    assert 0 < flipped < 12


def test_cutout_erases_one_square_of_one_grey():
    pixels = generated(4, 224, 224)
    erased = pixels.copy()
    cutout(erased, np.array([0.5, 0.25, 0.3]), 0.5)
    changed = np.flatnonzero((erased != pixels).any(-1).any(1))
    assert (changed.min(), changed.max()) == (56, 167)  # 112 rows centred on row 112
    np.testing.assert_array_equal(erased[56:168, 0:112], 76)  # centred on column 56, grey 0.3 x 256
    np.testing.assert_array_equal(erased[:56], pixels[:56])
    np.testing.assert_array_equal(erased[56:168, 112:], pixels[56:168, 112:])
    corner = pixels.copy()
    cutout(corner, np.array([0.0, 0.999, 0.0]), 0.5)  # clipped at the top and the right
    np.testing.assert_array_equal(corner[:56, 167:], 0)
    np.testing.assert_array_equal(corner[56:], pixels[56:])
    np.testing.assert_array_equal(corner[:, :167], pixels[:, :167])


def test_cutout_leaves_the_rest_of_the_augmented_image_as_it_was(photo):
    with_cutout = dataclasses.replace(PLAIN, cutout=0.5)
    for seed in range(6):
        plain = train_transform(photo, (1, 0, seed), PLAIN)
        erased = train_transform(photo, (1, 0, seed), with_cutout)
        rows = np.flatnonzero((plain != erased).any(-1).any(1))
        cols = np.flatnonzero((plain != erased).any(-1).any(0))
        square = erased[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
        assert (square == square[0, 0, 0]).all()
        assert rows.size <= 112
        assert cols.size <= 112


def test_crop_box_follows_its_area_and_aspect_ranges():
    scale, ratio = (0.08, 1.0), (3 / 4, 4 / 3)
    fractions = []
    for seed in range(2000):
        rng = np.random.default_rng(seed)
        left, top, right, bottom = crop_box((500, 375), rng, scale, ratio)
        width, height = right - left, bottom - top
        assert 0 <= left < right <= 500
        assert 0 <= top < bottom <= 375
        assert ratio[0] - 0.01 <= width / height <= ratio[1] + 0.01  # whole pixels
        fractions.append(width * height / (500 * 375))
        # A fixed count of draws: what comes next does not depend on the box.
        assert rng.random() == np.random.default_rng(seed).random(41)[-1]
    assert scale[0] - 0.001 <= min(fractions) < 0.1
    assert 0.95 < max(fractions) <= scale[1]
    # torchvision's sampler: 0.435 on this size (20,000 draws), since large boxes of an extreme
    # aspect ratio do not fit and are drawn again.
    assert 0.41 < np.mean(fractions) < 0.46


@pytest.mark.parametrize(("size", "expected"), [((900, 13), (441, 0, 458, 13)), ((13, 900), (0, 441, 13, 458))])
def test_crop_box_falls_back_to_the_closest_aspect_ratio(size, expected):
    assert crop_box(size, np.random.default_rng(0), (0.08, 1.0), (3 / 4, 4 / 3)) == expected


def test_reduced_jpeg_decode_is_close_to_the_full_decode():
    """Decoding at 1/2-1/8 scale in the DCT box-averages the pixels that the antialiased resize
    would have averaged anyway: the crops differ by the filters' shapes, under a grey level on
    average (measured 0.4-0.8 on this image), less than JPEG's own error at quality 90."""
    encoded = encode(generated(5, 1200, 1600))
    cfg = dataclasses.replace(PLAIN, crop_scale=(0.3, 1.0))  # boxes of at least 657 px: reduced 2-5x
    for seed in range(4):
        reduced = decode_crop(encoded, "image", np.random.default_rng(seed), cfg)
        full = decode_crop(encoded, "image", np.random.default_rng(seed), cfg, draft=False)
        difference = np.abs(np.asarray(reduced, np.float64) - np.asarray(full, np.float64))
        assert difference.mean() < 1.5


@pytest.mark.parametrize("encoded", [b"", b"not an image", encode(generated(6, 64, 64))[:300]])
def test_unreadable_bytes_name_the_image(encoded):
    with pytest.raises(InputError, match=r"^train/n01440764/broken\.jpg: unreadable image"):
        train_transform(encoded, (0, 0, 0), DEFAULT, "train/n01440764/broken.jpg")
