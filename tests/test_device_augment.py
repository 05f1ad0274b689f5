"""The augmentation on the device (JAX) against today's PIL operations at fixed parameters, and
its random choices checked statistically.

Bounds, from the arithmetic (tresnet_jax/data/device_augment.py's docstring):
- the table operations (auto_contrast, equalize, solarize, posterize, solarize_add and the
  contrast and brightness blends) and translations compute PIL's integers: within 1 level,
  because XLA may fuse a blend's multiply-add into one rounding (FMA) where PIL rounds twice;
- color and sharpness blend per pixel the same way: within 1 level;
- rotate and shear map coordinates in float32 where PIL uses float64: an error of about
  1e-5 px (224 px x float32's 6e-8) moves a bilinear value by under 255 x 2e-5 = 0.005 of a
  level, so a truncated value changes by 1 where the exact one lies that close to an integer
  (a fraction of a percent of pixels, 2 % allowed), and a pixel whose source lies on the
  image's edge may be grey on one side and not the other (at most one line of pixels along
  each edge: 2 (H + W)).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from tests.images import generated, photo
from tresnet_jax.data.augment import RANDAUGMENT_OPS, AugmentConfig, cutout
from tresnet_jax.data.device_augment import (
    GEOMETRIC,
    OP_NAMES,
    apply_op,
    augment_batch,
    augment_image,
    draws,
    image_keys,
)
from tresnet_jax.data.device_augment import cutout as device_cutout

DEFAULT = AugmentConfig()
apply_jitted = jax.jit(apply_op, static_argnums=3)


@pytest.fixture(scope="module")
def pictures() -> list[np.ndarray]:
    """A photograph and a generated texture, 224 x 224 (the grey photo as RGB)."""
    chelsea = np.asarray(Image.fromarray(photo("chelsea")).resize((224, 224), Image.Resampling.BILINEAR))
    return [chelsea, (40 + 0.63 * generated(2, 224, 224)).astype(np.uint8)]


@pytest.mark.parametrize("name", OP_NAMES)
def test_each_operation_matches_pil(pictures, name):
    pil_op = dict(RANDAUGMENT_OPS)[name]
    for pixels in pictures:
        for level in (0.9, 0.5):
            for sign in (1.0, -1.0):
                expected = np.asarray(pil_op(Image.fromarray(pixels), level, sign)).astype(np.int32)
                index = jnp.int32(OP_NAMES.index(name))
                got = np.asarray(apply_jitted(jnp.asarray(pixels, jnp.int32), index, jnp.float32(sign), level))
                diff = np.abs(got - expected)
                where = f"{name} at level {level}, sign {sign:+}"
                if name in GEOMETRIC:
                    assert (diff > 1).sum() <= 2 * (224 + 224), where
                    assert (diff > 0).mean() < 0.02, where
                else:
                    assert diff.max() <= 1, where
                if name in ("translate_x", "translate_y", "solarize", "posterize", "solarize_add", "equalize"):
                    assert diff.max() == 0, f"{where}: integer arithmetic, exact"


def test_flip_and_cutout_are_the_host_operations():
    pixels = generated(4, 224, 224)
    drawn = np.array([0.5, 0.25, 0.3], np.float32)  # exact in float32 and float64
    expected = pixels.copy()
    cutout(expected, drawn.tolist(), 0.5)
    np.testing.assert_array_equal(
        np.asarray(device_cutout(jnp.asarray(pixels, jnp.int32), jnp.asarray(drawn), 0.5)), expected
    )
    cfg = AugmentConfig(randaugment_ops=0, cutout=0.0)
    flipped = {"flip": jnp.bool_(True), "cutout": jnp.zeros(3), "op": jnp.zeros(0, jnp.int32), "sign": jnp.zeros(0)}
    np.testing.assert_array_equal(np.asarray(augment_image(jnp.asarray(pixels), flipped, cfg)), pixels[:, ::-1])
    kept = {**flipped, "flip": jnp.bool_(False)}
    np.testing.assert_array_equal(np.asarray(augment_image(jnp.asarray(pixels), kept, cfg)), pixels)


def test_the_draws_are_uniform_over_operations_signs_flips_and_cutouts():
    """20,000 images: each count within 5 standard deviations of its expectation (JAX's
    generator is the same on every machine, so this either always passes or never)."""
    n = 20_000
    ids = jnp.stack([jnp.zeros(n, jnp.int32), jnp.arange(n, dtype=jnp.int32)], 1)
    drawn = jax.vmap(lambda key: draws(key, DEFAULT))(image_keys(0, ids))

    def within(count: int, trials: int, p: float) -> bool:
        return abs(count - trials * p) <= 5 * np.sqrt(trials * p * (1 - p))

    ops = np.asarray(drawn["op"]).reshape(-1)
    assert ops.min() == 0
    assert ops.max() == len(OP_NAMES) - 1
    for index in range(len(OP_NAMES)):
        assert within(int((ops == index).sum()), ops.size, 1 / len(OP_NAMES)), OP_NAMES[index]
    assert within(int((np.asarray(drawn["sign"]) > 0).sum()), 2 * n, 0.5)
    assert within(int(np.asarray(drawn["flip"]).sum()), n, 0.5)
    grey = (np.asarray(drawn["cutout"][:, 2]) * 256).astype(int)
    assert grey.min() == 0
    assert grey.max() == 255
    assert within(int((grey < 128).sum()), n, 0.5)
    # The two slots of an image are independent: the same operation twice as often as 1/14.
    assert within(int((np.asarray(drawn["op"])[:, 0] == np.asarray(drawn["op"])[:, 1]).sum()), n, 1 / len(OP_NAMES))


def test_an_image_is_augmented_by_its_ids_alone():
    """The same (epoch, index) gives the same image wherever it sits in whichever batch; another
    epoch or index gives another augmentation."""
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.integers(0, 256, (6, 64, 64, 3), dtype=np.uint8))
    cfg = dataclasses.replace(DEFAULT, image_size=64)
    ids = jnp.asarray([[0, i] for i in range(6)], jnp.int32)
    batch = jax.jit(augment_batch, static_argnums=3)  # one compilation: the shapes stay
    whole = np.asarray(batch(images, ids, 7, cfg))
    reordered = np.asarray(batch(images[::-1], ids[::-1], 7, cfg))
    np.testing.assert_array_equal(whole, reordered[::-1])
    others = jnp.asarray(rng.integers(0, 256, (6, 64, 64, 3), dtype=np.uint8)).at[4].set(images[2])
    among_others = np.asarray(batch(others, ids.at[:, 1].add(100).at[4].set(ids[2]), 7, cfg))
    np.testing.assert_array_equal(among_others[4], whole[2])
    assert whole.dtype == np.uint8
    assert whole.shape == (6, 64, 64, 3)
    for other_ids, other_seed in ((ids.at[:, 0].set(1), 7), (ids.at[:, 1].add(6), 7), (ids, 8)):
        other = np.asarray(batch(images, other_ids, other_seed, cfg))
        assert all(not np.array_equal(other[i], whole[i]) for i in range(6))
