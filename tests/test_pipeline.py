"""The stages every input stream is made of: reading by key, an unreadable image replaced by the
next readable one with its own draws, what is left to the GPU decoder, batching and padding; and
a synthetic source, read through them as any source is."""

import io
import itertools

import numpy as np
import pytest
from PIL import Image

from tests.test_train_data import MemorySource
from tresnet_jax.data.augment import AugmentConfig, crop_box, train_transform
from tresnet_jax.data.pipeline import Example, ForDecoder, Read, eval_batches_of, host_images
from tresnet_jax.data.preprocess import EvalTransform, decode_pil, eval_box, pil_transform
from tresnet_jax.data.sources import LabelMap, SyntheticSource
from tresnet_jax.data.train_stream import StreamSpec, TrainTransform, train_batches
from tresnet_jax.errors import UnreadableImage
from tresnet_jax.evaluation import preprocessed_batches
from tresnet_jax.preprocessing import Preprocessing

AUGMENT = AugmentConfig(image_size=32)
LABELS = LabelMap(np.arange(5), 5)


def test_an_unreadable_image_gives_its_place_to_the_next_readable_one_with_its_own_draws():
    source = MemorySource(6, broken=frozenset({2, 3, 5}))
    work = TrainTransform(AUGMENT, seed=4)
    row, label, key, passed_over = Read(source, work, replace=True)((7, 2))
    assert (label, key) == (4, (7, 4))
    assert [index for index, _ in passed_over] == [2, 3]
    assert all(reason.startswith("unreadable image (") for _, reason in passed_over)
    np.testing.assert_array_equal(row, train_transform(source.images[4], (4, 7, 4), AUGMENT))
    assert Read(source, work, replace=True)((0, 5))[2] == (0, 0)  # past the end: from the start
    with pytest.raises(UnreadableImage, match=r"^memory\[2\]: unreadable image"):  # evaluation's: no replacement
        Read(source, work)((7, 2))


class Files:
    """A JPEG the decoder takes, a progressive one it does not, a PNG."""

    def __init__(self):
        pixels = np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)
        self.images = [encode(pixels, "JPEG"), encode(pixels, "JPEG", progressive=True), encode(pixels, "PNG")]

    name = "files"

    def __len__(self) -> int:
        return len(self.images)

    def record(self, index: int) -> tuple[bytes, int]:
        return self.images[index], index

    def describe(self, index: int) -> str:
        return f"files[{index}]"


def encode(pixels: np.ndarray, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt, **options)
    return buffer.getvalue()


def test_only_the_jpegs_the_decoder_takes_are_left_to_it_with_the_box_the_host_would_resize():
    source, prep = Files(), Preprocessing(32)
    values = [Read(source, EvalTransform(prep), for_decoder=True)((0, i))[0] for i in range(3)]
    assert values[0] == ForDecoder(source.images[0], eval_box((48, 40), prep))
    for value, encoded in zip(values[1:], source.images[1:], strict=True):
        np.testing.assert_array_equal(value, pil_transform(decode_pil(encoded, "x"), prep))
    work = TrainTransform(AugmentConfig(image_size=32, crop_scale=(0.3, 1.0)), seed=9)
    value = Read(source, work, replace=True, for_decoder=True)((5, 0))[0]
    assert value.box == crop_box((48, 40), np.random.default_rng((9, 5, 0)), (0.3, 1.0), work.augment.crop_ratio)


def test_evaluation_batches_are_padded_masked_and_as_many_as_every_process_runs():
    examples = [Example(np.full((4, 4, 3), 1 + i, np.uint8), i % 5, (0, 10 + i)) for i in range(5)]
    batches = list(eval_batches_of(examples, 2, 4, host_images(4), LABELS))
    assert [b["index"].tolist() for b in batches] == [[10, 11], [12, 13], [14, -1], [-1, -1]]
    assert [b["mask"].tolist() for b in batches] == [[True, True], [True, True], [True, False], [False, False]]
    assert [b["label"].tolist() for b in batches] == [[0, 1], [2, 3], [4, 0], [0, 0]]
    assert [b["image"][:, 0, 0, 0].tolist() for b in batches] == [[1, 2], [3, 4], [5, 0], [0, 0]]
    assert {b["image"].shape for b in batches} == {(2, 4, 4, 3)}
    assert {(b["image"].dtype.name, b["label"].dtype.name, b["index"].dtype.name) for b in batches} == {
        ("uint8", "int32", "int32")
    }


def test_a_synthetic_source_has_random_images_and_labels_made_from_their_index():
    source, multi = SyntheticSource(10, num_classes=5), SyntheticSource(40, num_classes=5, multi_label=True)
    encoded, label = source.record(3)
    assert source.record(3) == (encoded, label)
    assert encoded != source.record(4)[0]
    image = decode_pil(encoded, source.describe(3))
    assert (image.size, image.mode) == ((64, 64), "RGB")
    assert {source.record(i)[1] for i in range(10)} <= set(range(5))
    labels = [multi.record(i)[1] for i in range(40)]
    assert all(1 <= len(present) <= 3 and list(present) == sorted(set(present)) for present in labels)
    assert {c for present in labels for c in present} <= set(range(5))


def test_a_synthetic_source_goes_through_the_training_and_evaluation_streams_as_any_source():
    """The same global batches for 1 and 2 processes, a resumed stream continuing, augment ids
    of the images used; every image evaluated once, in order."""
    source = SyntheticSource(12, num_classes=5)
    one = list(itertools.islice(train_batches(source, StreamSpec(4, seed=1), AUGMENT, 0, LABELS, workers=2), 4))
    halves = [
        list(itertools.islice(train_batches(source, StreamSpec(4, p, 2, seed=1), AUGMENT, 0, LABELS, workers=2), 4))
        for p in range(2)
    ]
    resumed = next(train_batches(source, StreamSpec(4, seed=1), AUGMENT, 3, LABELS, workers=2, on_device=True))
    for step in range(4):
        for key in ("image", "label"):
            np.testing.assert_array_equal(one[step][key], np.concatenate([h[step][key] for h in halves]))
    np.testing.assert_array_equal(resumed["label"], one[3]["label"])
    assert [int(e) for e in resumed["augment_ids"][:, 0]] == [1] * 4  # step 3, 3 steps an epoch: epoch 1
    skipped: dict[int, str] = {}
    batches = list(preprocessed_batches(source, Preprocessing(32), 2, 12, LABELS, 4, 3, skipped, workers=2))
    assert skipped == {}
    assert [b["index"].tolist() for b in batches] == [[2, 3, 4, 5], [6, 7, 8, 9], [10, 11, -1, -1]]
    expected = [pil_transform(decode_pil(source.record(i)[0], "x"), Preprocessing(32)) for i in range(2, 12)]
    np.testing.assert_array_equal(np.concatenate([b["image"] for b in batches])[:10], np.stack(expected))
