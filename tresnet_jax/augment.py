"""Training augmentation in TensorFlow ops, every random choice drawn from a per-image seed with
stateless ops, so an image's augmentation depends only on (run seed, epoch, image) and a resumed
run sees exactly the images an uninterrupted one would.

The TResNet recipe: inception crop (random area and aspect ratio) + horizontal flip,
RandAugment, Cutout; mixup/cutmix are applied on the devices (training.py).
"""

from __future__ import annotations

import dataclasses
import math

from tresnet_jax.preprocess import tensorflow, to_uint8

GREY = 128.0
MAX_MAGNITUDE = 10.0


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """What happens to a training image."""

    image_size: int = 224
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    randaugment_ops: int = 2  # 0 disables RandAugment
    randaugment_magnitude: float = 9.0  # 0..10
    cutout: float = 0.5  # side of the erased square as a fraction of the image side; 0 disables


def train_transform(image, seed, cfg: AugmentConfig):
    """uint8 (H, W, 3) -> augmented uint8 (size, size, 3); ``seed`` is an int64 [2] tensor."""
    tf = tensorflow()
    seeds = tf.random.experimental.stateless_split(seed, num=4)
    image = inception_crop(image, seeds[0], cfg)
    if cfg.flip:
        image = tf.image.stateless_random_flip_left_right(image, seeds[1])
    if cfg.randaugment_ops:
        image = randaugment(image, seeds[2], cfg.randaugment_ops, cfg.randaugment_magnitude)
    if cfg.cutout:
        image = cutout(image, seeds[3], cfg.cutout)
    return tf.ensure_shape(image, [cfg.image_size, cfg.image_size, 3])


def inception_crop(image, seed, cfg: AugmentConfig):
    """A random crop of 8-100 % of the area and aspect ratio 3/4-4/3, resized to the input size."""
    tf = tensorflow()
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(image),
        bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
        seed=seed,
        area_range=cfg.crop_scale,
        aspect_ratio_range=cfg.crop_ratio,
        max_attempts=10,
        use_image_if_no_bounding_boxes=True,
    )
    crop = tf.slice(image, begin, size)
    resized = tf.image.resize(crop, [cfg.image_size, cfg.image_size], method="bilinear", antialias=True)
    return to_uint8(resized)


def cutout(image, seed, fraction: float):
    """Erase a square of side ``fraction`` x image side, centred anywhere (clipped at the
    borders), with a random grey level."""
    tf = tensorflow()
    height, width = tf.shape(image)[0], tf.shape(image)[1]
    side = tf.cast(tf.cast(tf.minimum(height, width), tf.float32) * fraction, tf.int32)
    position = tf.random.stateless_uniform([3], seed, 0.0, 1.0)
    cy = tf.cast(position[0] * tf.cast(height, tf.float32), tf.int32)
    cx = tf.cast(position[1] * tf.cast(width, tf.float32), tf.int32)
    rows = tf.range(height)[:, None]
    cols = tf.range(width)[None, :]
    inside = (tf.abs(rows - cy) * 2 < side) & (tf.abs(cols - cx) * 2 < side)
    fill = tf.cast(position[2] * 255.0, tf.uint8)
    return tf.where(inside[:, :, None], fill, image)


# --- RandAugment -----------------------------------------------------------------------------
# Each operation takes (image uint8, level in [0, 1], sign +-1) and returns uint8.


def _blend(tf, degenerate, image, factor):
    """image + factor * (image - degenerate), as PIL's ImageEnhance does."""
    out = tf.cast(degenerate, tf.float32) + factor * (tf.cast(image, tf.float32) - tf.cast(degenerate, tf.float32))
    return to_uint8(out)


def _enhance(degenerate_fn):
    def op(image, level, sign):
        tf = tensorflow()
        return _blend(tf, degenerate_fn(tf, image), image, 1.0 + sign * 0.9 * level)

    return op


def _grey(tf, image):
    return tf.image.grayscale_to_rgb(tf.image.rgb_to_grayscale(image))


def _mean_grey(tf, image):
    mean = tf.reduce_mean(tf.cast(tf.image.rgb_to_grayscale(image), tf.float32))
    return tf.fill(tf.shape(image), tf.cast(mean, tf.uint8))


def _smoothed(tf, image):
    """PIL's SMOOTH filter (3x3, centre weight 5, total 13); border pixels stay as they are."""
    kernel = tf.constant([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]) / 13.0
    kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
    smooth = tf.nn.depthwise_conv2d(tf.cast(image, tf.float32)[None], kernel, [1, 1, 1, 1], "VALID")[0]
    smooth = to_uint8(smooth)
    interior = tf.pad(tf.ones_like(smooth), [[1, 1], [1, 1], [0, 0]]) > 0
    return tf.where(interior, tf.pad(smooth, [[1, 1], [1, 1], [0, 0]]), image)


def _affine(image, transform):
    """Apply a 3x3 projective transform (output -> input coordinates), grey fill."""
    tf = tensorflow()
    flat = tf.reshape(tf.cast(transform, tf.float32), [9])[:8][None]
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=tf.cast(image, tf.float32)[None], transforms=flat, output_shape=tf.shape(image)[:2],
        fill_value=GREY, interpolation="BILINEAR", fill_mode="CONSTANT",
    )[0]
    return to_uint8(out)


def _rotate(image, level, sign):
    tf = tensorflow()
    angle = sign * level * 30.0 * math.pi / 180.0
    h, w = tf.cast(tf.shape(image)[0], tf.float32), tf.cast(tf.shape(image)[1], tf.float32)
    cos, sin = tf.cos(angle), tf.sin(angle)
    cy, cx = (h - 1) / 2, (w - 1) / 2
    matrix = [[cos, -sin, cx - cos * cx + sin * cy], [sin, cos, cy - sin * cx - cos * cy], [0.0, 0.0, 1.0]]
    return _affine(image, matrix)


def _shear(axis):
    def op(image, level, sign):
        s = sign * level * 0.3
        matrix = [[1.0, s, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]] if axis == 1 else [
            [1.0, 0.0, 0.0], [s, 1.0, 0.0], [0.0, 0.0, 1.0]]
        return _affine(image, matrix)

    return op


def _translate(axis):
    def op(image, level, sign):
        tf = tensorflow()
        shift = sign * level * 0.45 * tf.cast(tf.shape(image)[1 - axis], tf.float32)
        zero = tf.constant(0.0)
        matrix = [[1.0, 0.0, shift if axis == 0 else zero], [0.0, 1.0, shift if axis == 1 else zero], [0.0, 0.0, 1.0]]
        return _affine(image, matrix)

    return op


def _auto_contrast(image, level, sign):
    tf = tensorflow()
    x = tf.cast(image, tf.float32)
    low = tf.reduce_min(x, axis=[0, 1])
    high = tf.reduce_max(x, axis=[0, 1])
    scale = tf.where(high > low, 255.0 / tf.maximum(high - low, 1.0), 1.0)
    out = tf.where(high > low, (x - low) * scale, x)
    return to_uint8(out)


def _equalize(image, level, sign):
    tf = tensorflow()

    def channel(c):
        values = tf.cast(c, tf.int32)
        histogram = tf.math.bincount(values, minlength=256, maxlength=256)
        nonzero = tf.boolean_mask(histogram, histogram > 0)
        step = (tf.reduce_sum(nonzero) - nonzero[-1]) // 255
        lut = (tf.cumsum(histogram) - histogram + step // 2) // tf.maximum(step, 1)
        lut = tf.clip_by_value(lut, 0, 255)
        return tf.where(step > 0, tf.cast(tf.gather(lut, values), tf.uint8), c)

    return tf.stack([channel(image[:, :, i]) for i in range(3)], axis=-1)


def _posterize(image, level, sign):
    """Keep the top 8 - 4 * level bits of every channel."""
    tf = tensorflow()
    shift = tf.cast(tf.round(level * 4.0), tf.uint8)
    return tf.bitwise.left_shift(tf.bitwise.right_shift(image, shift), shift)


def _solarize(image, level, sign):
    tf = tensorflow()
    threshold = tf.cast(256.0 - level * 256.0, tf.float32)
    return tf.where(tf.cast(image, tf.float32) >= threshold, 255 - image, image)


def _solarize_add(image, level, sign):
    tf = tensorflow()
    added = tf.cast(tf.clip_by_value(tf.cast(image, tf.int32) + tf.cast(level * 110, tf.int32), 0, 255), tf.uint8)
    return tf.where(image < 128, added, image)


RANDAUGMENT_OPS = (
    ("auto_contrast", _auto_contrast),
    ("equalize", _equalize),
    ("rotate", _rotate),
    ("solarize", _solarize),
    ("color", _enhance(_grey)),
    ("posterize", _posterize),
    ("contrast", _enhance(_mean_grey)),
    ("brightness", _enhance(lambda tf, image: tf.zeros_like(image))),
    ("sharpness", _enhance(_smoothed)),
    ("shear_x", _shear(1)),
    ("shear_y", _shear(0)),
    ("translate_x", _translate(1)),
    ("translate_y", _translate(0)),
    ("solarize_add", _solarize_add),
)


def randaugment(image, seed, num_ops: int, magnitude: float):
    """Apply ``num_ops`` operations chosen uniformly at random, each at ``magnitude`` (0-10) with
    a random sign for the symmetric ones."""
    tf = tensorflow()
    level = tf.constant(magnitude / MAX_MAGNITUDE, tf.float32)
    for seed_i in tf.unstack(tf.random.experimental.stateless_split(seed, num=num_ops)):
        choice_seed, sign_seed = tf.unstack(tf.random.experimental.stateless_split(seed_i, num=2))
        choice = tf.random.stateless_uniform([], choice_seed, 0, len(RANDAUGMENT_OPS), dtype=tf.int32)
        sign = tf.where(tf.random.stateless_uniform([], sign_seed) < 0.5, -1.0, 1.0)
        branches = [lambda op=op, x=image, s=sign: op(x, level, s) for _, op in RANDAUGMENT_OPS]
        image = tf.ensure_shape(tf.switch_case(choice, branches), image.shape)
    return image
