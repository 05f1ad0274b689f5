"""The training augmentation after the crop, in JAX on the accelerator: flip, RandAugment and
Cutout of ``augment.train_transform``, batched (vmap) inside the compiled training step.

The host hands over uint8 crops and, per image, the (epoch, image index) of its draws; the key
of an image is ``fold_in(fold_in(key(seed), epoch), index)``, so its augmentation depends on
nothing else: not the device count, the batch it lands in, a resume or a skipped fp16 step.
The draws are JAX's, not NumPy's: the device path augments an image differently from the host
path (same distribution, other samples).

Every operation reproduces PIL's arithmetic on 8-bit values (bench and tests compare them):
  - the colour operations that are per-channel tables (auto_contrast, equalize, solarize,
    posterize, contrast, brightness, solarize_add) build PIL's 256-entry table per image and
    look every pixel up in it; color and sharpness blend with PIL's degenerate image (its
    ITU-R 601 grey, its 3x3 smoothing) and truncate as ``Image.blend`` does;
  - the geometric ones (rotate, shear, translate) are one affine warp per operation with PIL's
    conventions: output pixel centres mapped through the matrix, uncovered pixels grey,
    bilinear weights from the two nearest rows and columns (clamped at the edges), truncated.
    PIL maps coordinates in float64, we in float32: a pixel whose exact value lies within
    about 1e-3 of an integer may come out one level lower or higher, and one whose source
    lies within about 1e-5 pixels of the image's edge may be grey on one side and not on the
    other. Translations (whole pixels) are exact.
Every image evaluates every operation and keeps the drawn one (vmap turns the choice into a
select): what is chosen costs the same as what is not, and the step's shape never changes.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from tresnet_jax.data.augment import GREY, MAX_MAGNITUDE, RANDAUGMENT_OPS, AugmentConfig

OP_NAMES = tuple(name for name, _ in RANDAUGMENT_OPS)  # the host's order: the same op for a draw
GEOMETRIC = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")
TABLES = ("auto_contrast", "equalize", "solarize", "posterize", "contrast", "brightness", "solarize_add")
FLIP_DRAWS, CUTOUT_DRAWS = 1, 3


def image_keys(seed: int, ids: jax.Array) -> jax.Array:
    """One key per image from int32 (n, 2) rows of (epoch, image index)."""
    base = jax.random.key(seed)
    return jax.vmap(lambda epoch, index: jax.random.fold_in(jax.random.fold_in(base, epoch), index))(
        ids[:, 0], ids[:, 1]
    )


def draws(key: jax.Array, cfg: AugmentConfig) -> dict[str, jax.Array]:
    """An image's random numbers: flip, cutout (3), and per RandAugment slot the operation's
    index into OP_NAMES and its sign."""
    u = jax.random.uniform(key, (FLIP_DRAWS + CUTOUT_DRAWS + 2 * cfg.randaugment_ops,))
    slots = u[FLIP_DRAWS + CUTOUT_DRAWS :].reshape(cfg.randaugment_ops, 2)
    return {
        "flip": u[0] < 0.5,
        "cutout": u[FLIP_DRAWS : FLIP_DRAWS + CUTOUT_DRAWS],
        "op": jnp.minimum((slots[:, 0] * len(OP_NAMES)).astype(jnp.int32), len(OP_NAMES) - 1),
        "sign": jnp.where(slots[:, 1] < 0.5, -1.0, 1.0),
    }


def augment_batch(images: jax.Array, ids: jax.Array, seed: int, cfg: AugmentConfig) -> jax.Array:
    """uint8 (n, S, S, 3) crops and their (epoch, index) rows -> uint8 (n, S, S, 3) flipped,
    RandAugment-ed and cut out as ``cfg`` says."""
    keys = image_keys(seed, ids)
    return jax.vmap(lambda image, key: augment_image(image, draws(key, cfg), cfg))(images, keys)


def augment_image(image: jax.Array, drawn: dict[str, jax.Array], cfg: AugmentConfig) -> jax.Array:
    """One uint8 (H, W, 3) image with its ``draws``."""
    pixels = image.astype(jnp.int32)
    if cfg.flip:
        pixels = jnp.where(drawn["flip"], pixels[:, ::-1], pixels)
    level = cfg.randaugment_magnitude / MAX_MAGNITUDE
    for slot in range(cfg.randaugment_ops):
        pixels = apply_op(pixels, drawn["op"][slot], drawn["sign"][slot], level)
    if cfg.cutout:
        pixels = cutout(pixels, drawn["cutout"], cfg.cutout)
    return pixels.astype(jnp.uint8)


def apply_op(pixels: jax.Array, op: jax.Array, sign: jax.Array, level: float) -> jax.Array:
    """RandAugment operation ``OP_NAMES[op]`` at ``level`` (0-1) and ``sign`` on int32 (H, W, 3)."""
    height, width, _ = pixels.shape
    matrices = {name: affine_matrices(name, level, width, height) for name in GEOMETRIC}
    identity = np.array([1.0, 0.0, 0.0, 0.0, 1.0, 0.0])
    positive = np.stack([matrices[n][0] if n in matrices else identity for n in OP_NAMES])
    negative = np.stack([matrices[n][1] if n in matrices else identity for n in OP_NAMES])
    matrix = jnp.where(sign > 0, jnp.asarray(positive, jnp.float32)[op], jnp.asarray(negative, jnp.float32)[op])
    warped = affine(pixels, matrix)

    # The enhancers' factor, rounded to float32 from float64 as PIL's call rounds it.
    factor = jnp.where(sign > 0, np.float32(1.0 + 0.9 * level), np.float32(1.0 - 0.9 * level))
    tables = channel_tables(warped, factor, level)
    table_index = jnp.asarray([TABLES.index(n) if n in TABLES else len(TABLES) for n in OP_NAMES])[op]
    identity_table = jnp.broadcast_to(jnp.arange(256, dtype=jnp.int32), (3, 256))
    table = jnp.concatenate([tables, identity_table[None]])[table_index]
    looked_up = jnp.take_along_axis(table.T, warped.reshape(-1, 3), axis=0).reshape(warped.shape)

    name = lambda n: op == OP_NAMES.index(n)  # noqa: E731
    out = jnp.where(name("color"), blend(grey(warped)[..., None], warped, factor), looked_up)
    return jnp.where(name("sharpness"), blend(smoothed(warped), warped, factor), out)


# --- the per-channel tables --------------------------------------------------------------------


def channel_tables(pixels: jax.Array, factor: jax.Array, level: float) -> jax.Array:
    """int32 (len(TABLES), 3, 256): each table operation's lookup table for this image."""
    values = jnp.arange(256, dtype=jnp.int32)
    counts = jnp.bincount((pixels + 256 * jnp.arange(3)).reshape(-1), length=3 * 256).reshape(3, 256)
    present = counts > 0
    low = jnp.argmax(present, axis=1)[:, None]
    high = (255 - jnp.argmax(present[:, ::-1], axis=1))[:, None]
    spread = jnp.maximum(high - low, 1)
    auto_contrast = jnp.where(high > low, jnp.clip((values - low) * 255 // spread, 0, 255), values)

    # PIL's equalize: step = (pixels - count of the last used level) // 255, and level i maps to
    # (step // 2 + pixels below i) // step; an image using one level (or step 0) is unchanged.
    total = counts.sum(axis=1, keepdims=True)
    last_count = jnp.take_along_axis(counts, high, axis=1)
    step = (total - last_count) // 255
    below = jnp.cumsum(counts, axis=1) - counts
    equalized = jnp.clip((step // 2 + below) // jnp.maximum(step, 1), 0, 255)
    equalize = jnp.where((present.sum(axis=1, keepdims=True) > 1) & (step > 0), equalized, values)

    threshold = 256.0 - 256.0 * level
    solarize = jnp.where(values < threshold, values, 255 - values)
    bits = 8 - round(4 * level)
    posterize = values & ~(2 ** (8 - bits) - 1)
    mean = (2 * grey(pixels).sum() + pixels.shape[0] * pixels.shape[1]) // (2 * pixels.shape[0] * pixels.shape[1])
    contrast = blend(mean, values, factor)
    brightness = blend(jnp.zeros((), jnp.int32), values, factor)
    added = int(110 * level)
    solarize_add = jnp.where(values < 128, jnp.minimum(values + added, 255), values)
    by_name = {
        "auto_contrast": auto_contrast,
        "equalize": equalize,
        "solarize": solarize,
        "posterize": posterize,
        "contrast": contrast,
        "brightness": brightness,
        "solarize_add": solarize_add,
    }
    return jnp.stack([jnp.broadcast_to(by_name[n], (3, 256)) for n in TABLES])


# --- blends with a degenerate image ----------------------------------------------------------


def blend(degenerate: jax.Array, pixels: jax.Array, factor: jax.Array) -> jax.Array:
    """PIL's ``Image.blend(degenerate, image, factor)``: float32 arithmetic, truncated, clipped."""
    mixed = degenerate.astype(jnp.float32) + factor * (pixels - degenerate).astype(jnp.float32)
    return jnp.clip(jnp.floor(mixed), 0, 255).astype(jnp.int32)


def grey(pixels: jax.Array) -> jax.Array:
    """PIL's RGB -> L: (19595 R + 38470 G + 7471 B + 2**15) >> 16, (H, W)."""
    weights = jnp.asarray([19595, 38470, 7471], jnp.int32)
    return ((pixels * weights).sum(-1) + 0x8000) >> 16


def smoothed(pixels: jax.Array) -> jax.Array:
    """PIL's ImageFilter.SMOOTH: [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13 rounded, edges kept."""
    height, width, _ = pixels.shape
    padded = jnp.pad(pixels, ((1, 1), (1, 1), (0, 0)))
    total = 4 * pixels
    for dy in range(3):
        for dx in range(3):
            total = total + padded[dy : dy + height, dx : dx + width]
    inner = (2 * total + 13) // 26
    rows, cols = jnp.arange(height)[:, None, None], jnp.arange(width)[None, :, None]
    edge = (rows == 0) | (rows == height - 1) | (cols == 0) | (cols == width - 1)
    return jnp.where(edge, pixels, inner)


# --- geometry ----------------------------------------------------------------------------------


def affine_matrices(name: str, level: float, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """(positive sign, negative sign) matrices (a, b, c, d, e, f) of a geometric operation, as
    augment.py's PIL calls build them: output (x, y) samples input (a x + b y + c, d x + e y + f)."""

    def matrix(sign: float) -> np.ndarray:
        if name == "rotate":  # Image.rotate about the centre, counter-clockwise in degrees
            angle = -math.radians((sign * 30.0 * level) % 360.0)
            cos, sin = round(math.cos(angle), 15), round(math.sin(angle), 15)
            cx, cy = width / 2, height / 2
            return np.array([cos, sin, cos * -cx + sin * -cy + cx, -sin, cos, -sin * -cx + cos * -cy + cy])
        if name == "shear_x":
            return np.array([1.0, sign * 0.3 * level, 0.0, 0.0, 1.0, 0.0])
        if name == "shear_y":
            return np.array([1.0, 0.0, 0.0, sign * 0.3 * level, 1.0, 0.0])
        if name == "translate_x":
            return np.array([1.0, 0.0, round(sign * 0.45 * level * width), 0.0, 1.0, 0.0])
        if name == "translate_y":
            return np.array([1.0, 0.0, 0.0, 0.0, 1.0, round(sign * 0.45 * level * height)])
        raise ValueError(f"not a geometric operation: {name}")

    return matrix(1.0), matrix(-1.0)


def affine(pixels: jax.Array, matrix: jax.Array) -> jax.Array:
    """PIL's AFFINE transform with BILINEAR resampling and a grey fill, on int32 (H, W, 3)."""
    height, width, _ = pixels.shape
    ys, xs = jnp.meshgrid(
        jnp.arange(height, dtype=jnp.float32) + 0.5, jnp.arange(width, dtype=jnp.float32) + 0.5, indexing="ij"
    )
    a, b, c, d, e, f = (matrix[i] for i in range(6))
    x_in, y_in = a * xs + b * ys + c, d * xs + e * ys + f
    inside = (x_in >= 0) & (x_in < width) & (y_in >= 0) & (y_in < height)
    x_in, y_in = x_in - 0.5, y_in - 0.5
    x0, y0 = jnp.floor(x_in), jnp.floor(y_in)
    dx, dy = (x_in - x0)[..., None], (y_in - y0)[..., None]
    left, right = (jnp.clip(x0 + i, 0, width - 1).astype(jnp.int32) for i in (0, 1))
    top, bottom = (jnp.clip(y0 + i, 0, height - 1).astype(jnp.int32) for i in (0, 1))
    values = pixels.astype(jnp.float32)
    upper = values[top, left] + (values[top, right] - values[top, left]) * dx
    lower = values[bottom, left] + (values[bottom, right] - values[bottom, left]) * dx
    sampled = jnp.floor(upper + (lower - upper) * dy).astype(jnp.int32)
    return jnp.where(inside[..., None], sampled, jnp.asarray(GREY, jnp.int32))


def cutout(pixels: jax.Array, drawn: jax.Array, fraction: float) -> jax.Array:
    """augment.cutout: a square of side ``fraction`` x the shorter side about a random pixel
    (clipped at the borders), one random grey level; ``drawn``: 3 numbers in [0, 1)."""
    height, width, _ = pixels.shape
    side = int(min(height, width) * fraction)
    top = (drawn[0] * height).astype(jnp.int32) - side // 2
    left = (drawn[1] * width).astype(jnp.int32) - side // 2
    rows, cols = jnp.arange(height)[:, None], jnp.arange(width)[None, :]
    inside = (rows >= jnp.maximum(top, 0)) & (rows < jnp.maximum(top + side, 0))
    inside &= (cols >= jnp.maximum(left, 0)) & (cols < jnp.maximum(left + side, 0))
    return jnp.where(inside[..., None], (drawn[2] * 256).astype(jnp.int32), pixels)
