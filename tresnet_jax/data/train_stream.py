"""The training input stream: deterministic per (seed, step), resumable at any step in O(1), and
split across processes so that every process count sees the same global batches.

Every source is read by index (folders, CSVs, TFDS splits and synthetic images alike,
``data.sources``): each epoch is a seeded permutation of the images, global batch ``k`` is its ``k``-th slice, process
``p`` takes the ``p``-th part of that slice, and an image's augmentation is drawn from (run
seed, epoch, image index). Resuming at step ``s`` starts at the right slice of the right
epoch's permutation: nothing is read twice, whatever ``s`` is.

An image that cannot be read is replaced by the next readable one in the dataset (so batches
keep their size and every process count sees the same replacement), and reported once.

Where the augmentation runs: ``on_device=False`` does all of it here on the host
(``augment.train_transform``); ``on_device=True`` only the crop (read, decode, inception crop,
resize: ``augment.decode_crop``), and each batch carries ``augment_ids``, the (epoch, image
index) whose draws the device's flip, RandAugment and Cutout use (``device_augment``): the index
of the image actually used, so a replaced image brings its own draws on either path. A model
that drops out (an ML-Decoder head) draws each example's masks from the same ids, so its
batches carry them wherever the augmentation runs (``ids``).

The stream is ``pipeline``'s stages: ``train_keys``, ``pipeline.Read`` of ``TrainTransform``
with replacement on the host pool, ``pipeline.train_examples``, ``pipeline.train_batches_of``
(``gpu_batches.decoded_train_batches`` adds the GPU decoder's stage to the same).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import numpy as np

from tresnet_jax.data.augment import AugmentConfig, crop_box, decode_crop, train_transform
from tresnet_jax.data.host_pool import HostCost, ordered_map
from tresnet_jax.data.pipeline import Key, Read, host_images, train_batches_of, train_examples
from tresnet_jax.data.sources import LabelMap, Source
from tresnet_jax.errors import InputError

if TYPE_CHECKING:
    from tresnet_jax.data.gpu_decode import Box


@dataclasses.dataclass(frozen=True)
class StreamSpec:
    """How the global batches of a run are formed."""

    global_batch: int
    process_index: int = 0
    process_count: int = 1
    seed: int = 0

    @property
    def local_batch(self) -> int:
        return self.global_batch // self.process_count


def steps_per_epoch(source: Source, spec: StreamSpec) -> int:
    """Full global batches per epoch (the incomplete last one is dropped in training)."""
    steps = len(source) // spec.global_batch
    if steps == 0:
        raise InputError(f"{source.name} has {len(source)} images: fewer than one batch of {spec.global_batch}")
    return steps


def epoch_order(seed: int, epoch: int, size: int) -> np.ndarray:
    """The image order of one epoch."""
    return np.random.default_rng([seed, epoch]).permutation(size)


def host_indices(size: int, spec: StreamSpec, epoch: int, first_step: int = 0) -> np.ndarray:
    """This process's image indices for the steps of ``epoch`` from ``first_step`` on."""
    steps = size // spec.global_batch
    order = epoch_order(spec.seed, epoch, size)[: steps * spec.global_batch]
    per_step = order.reshape(steps, spec.process_count, spec.local_batch)
    return per_step[first_step:, spec.process_index].reshape(-1)


def train_keys(source: Source, spec: StreamSpec, start_step: int) -> Iterator[Key]:
    """This process's (epoch, image index) of every step from ``start_step`` on, without end."""
    first_epoch, first_step = divmod(start_step, steps_per_epoch(source, spec))
    for epoch in itertools.count(first_epoch):
        for index in host_indices(len(source), spec, epoch, first_step if epoch == first_epoch else 0):
            yield epoch, int(index)


@dataclasses.dataclass(frozen=True)
class TrainTransform:
    """A training image's host work (``pipeline.ImageWork``), drawn from (run seed, epoch, image
    index): all of the augmentation (``augment.train_transform``), or with ``crop_only`` only
    its crop (``augment.decode_crop``, the same draws), for the device to augment."""

    augment: AugmentConfig
    seed: int
    crop_only: bool = False
    interpolation = "bilinear"  # the crop's resize

    @property
    def size(self) -> int:
        return self.augment.image_size

    def row(self, encoded: bytes, name: str, key: Key) -> np.ndarray:
        if self.crop_only:
            return np.asarray(decode_crop(encoded, name, np.random.default_rng((self.seed, *key)), self.augment))
        return train_transform(encoded, (self.seed, *key), self.augment, name)

    def box(self, size: tuple[int, int], key: Key) -> Box:
        if self.augment.squish:
            return (0, 0, *size)
        return crop_box(
            size, np.random.default_rng((self.seed, *key)), self.augment.crop_scale, self.augment.crop_ratio
        )


def train_batches(
    source: Source,
    spec: StreamSpec,
    augment: AugmentConfig,
    start_step: int,
    label_map: LabelMap,
    on_unreadable: Callable[[str, str], None] | None = None,
    workers: int | None = None,
    on_device: bool = False,
    cost: HostCost | None = None,
    ids: bool = False,
) -> Iterator[dict[str, np.ndarray]]:
    """Endless batches {image uint8 (local batch, S, S, 3), label: ``label_map.rows``} from
    ``start_step`` (``on_device``: cropped images, and ``augment_ids`` int32 (local batch, 2);
    ``ids``: the ``augment_ids`` also with the images augmented here, for a model whose dropout
    draws from them); ``on_unreadable(image, reason)`` is called once for each image passed
    over; ``cost`` accumulates the host's CPU time per image."""
    work = TrainTransform(augment, spec.seed, crop_only=on_device)
    keys = train_keys(source, spec, start_step)
    outcomes = ordered_map(Read(source, work, replace=True), keys, workers, cost=cost)
    examples = train_examples(outcomes, source.describe, on_unreadable)
    yield from train_batches_of(examples, spec.local_batch, host_images(work.size), label_map, on_device or ids)
