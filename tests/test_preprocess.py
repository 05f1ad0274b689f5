"""The evaluation preprocessing (``tresnet_jax.preprocessing.Preprocessing``, the pixels of
``data.preprocess``) against the official eval's transform written independently with PIL
(tests/classifier.py), and the record's rules and metadata form."""

import numpy as np
import pytest
from PIL import Image

from tests.classifier import pil_preprocess
from tests.images import photo_files
from tresnet_jax.data.preprocess import load_image
from tresnet_jax.errors import InputError
from tresnet_jax.preprocessing import Preprocessing


def test_preprocessing_equals_pil_on_real_photographs(tmp_path):
    """The official eval's transform, written independently with PIL (tests/classifier.py):
    the same pixels, on 14 photographs at 224 (JPEG q90 and PNG)."""
    for path in photo_files(tmp_path):
        ours = load_image(path, Preprocessing(224))
        assert ours.shape == (224, 224, 3)
        assert ours.dtype == np.float32
        np.testing.assert_array_equal(ours, pil_preprocess(path, 224))


@pytest.mark.parametrize(
    ("prep", "resample"),
    [(Preprocessing(448, squish=True), Image.BILINEAR), (Preprocessing(128, 0.95, "bicubic"), Image.BICUBIC)],
)
def test_squish_and_bicubic_match_pil(tmp_path, prep, resample):
    for path in photo_files(tmp_path)[:6]:
        reference = pil_preprocess(path, prep.input_size, prep.crop_pct, prep.squish, resample)
        np.testing.assert_array_equal(load_image(path, prep), reference)


def test_bad_preprocessing_settings_are_rejected():
    for size in (102, 0, -32, 2):
        with pytest.raises(InputError, match=f"image size must be a positive multiple of 4, got {size}"):
            Preprocessing(size)
    Preprocessing(368)  # sides that are not multiples of 32 round up in the stages, as in timm
    with pytest.raises(InputError, match=r"crop fraction must be in \(0, 1\], got 1.5"):
        Preprocessing(224, 1.5)
