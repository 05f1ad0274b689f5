"""The training input stream: the same global batches for any process count, resumed at any
step by reading only what that step needs, unreadable images replaced and reported."""

import io

import numpy as np
import pytest
from PIL import Image

from tresnet_jax.data.augment import AugmentConfig, train_transform
from tresnet_jax.data.pipeline import MAX_CONSECUTIVE_UNREADABLE
from tresnet_jax.data.sources import LabelMap
from tresnet_jax.data.train_stream import StreamSpec, host_indices, train_batches
from tresnet_jax.errors import InputError

SIZE = 32
AUGMENT = AugmentConfig(image_size=SIZE)


def png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


class MemorySource:
    """Images in memory, counting every read; the images in ``broken`` cannot be decoded."""

    def __init__(self, size: int, broken: frozenset[int] = frozenset()):
        self.images = [b"not an image" if i in broken else png(i) for i in range(size)]
        self.class_names = [str(c) for c in range(5)]
        self.reads: list[int] = []

    name = "memory"

    def __len__(self) -> int:
        return len(self.images)

    def record(self, index: int) -> tuple[bytes, int]:
        self.reads.append(index)
        return self.images[index], index % 5

    def describe(self, index: int) -> str:
        return f"memory[{index}]"


LABELS = LabelMap(np.arange(5), 5)


def take(batches, n):
    return [next(batches) for _ in range(n)]


def test_processes_split_each_global_batch_exactly():
    """2 processes with 4 images each see, concatenated, what 1 process sees with 8."""
    source = MemorySource(40)
    one = take(train_batches(source, StreamSpec(8, seed=3), AUGMENT, 0, LABELS, workers=2), 6)
    halves = [
        take(train_batches(source, StreamSpec(8, p, 2, seed=3), AUGMENT, 0, LABELS, workers=2), 6) for p in range(2)
    ]
    for step in range(6):  # one epoch (5 steps) and the first step of the next
        for key in ("image", "label"):
            np.testing.assert_array_equal(one[step][key], np.concatenate([halves[0][step][key], halves[1][step][key]]))


def test_resume_at_a_late_step_reads_only_that_steps_images():
    """Step 5 * 1000 + 3 (epoch 1000): the first batch is the one an uninterrupted run would
    see there, and only its images (and the pool's read-ahead) are read, not 5003 steps'."""
    source = MemorySource(40)
    spec = StreamSpec(8, seed=1)
    stream = train_batches(source, spec, AUGMENT, 5 * 1000 + 3, LABELS, workers=2)
    batch = next(stream)
    stream.close()
    indices = host_indices(40, spec, epoch=1000, first_step=3)[:8]
    expected = np.stack([train_transform(source.images[i], (1, 1000, i), AUGMENT) for i in indices])
    np.testing.assert_array_equal(batch["image"], expected)
    np.testing.assert_array_equal(batch["label"], indices % 5)
    assert len(source.reads) <= 8 + 4 * 2  # the batch, and at most the read-ahead of 2 workers


def test_a_resumed_stream_continues_the_uninterrupted_one():
    source = MemorySource(24)
    spec = StreamSpec(8, seed=0)
    whole = take(train_batches(source, spec, AUGMENT, 0, LABELS, workers=2), 8)  # 3 steps per epoch
    resumed = take(train_batches(source, spec, AUGMENT, 4, LABELS, workers=2), 4)
    for a, b in zip(whole[4:], resumed, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])


def test_unreadable_images_are_replaced_reported_once_and_the_same_for_any_process_count():
    source = MemorySource(16, broken=frozenset({2, 3, 11}))
    reported: list[tuple[str, str]] = []
    one = take(train_batches(source, StreamSpec(8), AUGMENT, 0, LABELS, lambda *r: reported.append(r), 2), 4)
    assert sorted(name for name, _ in reported) == ["memory[11]", "memory[2]", "memory[3]"]
    assert all("unreadable image" in reason for _, reason in reported)
    # An unreadable image's place holds the next readable one (2 and 3 -> 4), with its own draws.
    order = host_indices(16, StreamSpec(8), epoch=0)
    row = int(np.flatnonzero(order == 2)[0])
    step, position = divmod(row, 8)
    np.testing.assert_array_equal(one[step]["image"][position], train_transform(source.images[4], (0, 0, 4), AUGMENT))
    assert one[step]["label"][position] == 4
    halves = [take(train_batches(source, StreamSpec(8, p, 2), AUGMENT, 0, LABELS, workers=2), 4) for p in range(2)]
    for step in range(4):
        np.testing.assert_array_equal(one[step]["image"], np.concatenate([h[step]["image"] for h in halves]))


def test_a_dataset_of_unreadable_images_stops_with_one_clear_error():
    source = MemorySource(MAX_CONSECUTIVE_UNREADABLE + 8, broken=frozenset(range(MAX_CONSECUTIVE_UNREADABLE + 8)))
    with pytest.raises(InputError, match=f"memory: {MAX_CONSECUTIVE_UNREADABLE} consecutive unreadable images"):
        next(train_batches(source, StreamSpec(8), AUGMENT, 0, LABELS, workers=2))
