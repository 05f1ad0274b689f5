"""The training input stream: deterministic per (seed, step), resumable at any step in O(1), and
split across processes so that every process count sees the same global batches.

Every source is read by index (folders and TFDS splits alike, ``data.sources``): each
epoch is a seeded permutation of the images, global batch ``k`` is its ``k``-th slice, process
``p`` takes the ``p``-th part of that slice, and an image's augmentation is drawn from (run
seed, epoch, image index). Resuming at step ``s`` starts at the right slice of the right
epoch's permutation: nothing is read twice, whatever ``s`` is.

An image that cannot be read is replaced by the next readable one in the dataset (so batches
keep their size and every process count sees the same replacement), and reported once.

Where the augmentation runs: ``on_device=False`` does all of it here on the host
(``augment.train_transform``); ``on_device=True`` only the crop (read, decode, inception crop,
resize: ``augment.decode_crop``), and each batch carries ``augment_ids``, the (epoch, image
index) whose draws the device's flip, RandAugment and Cutout use (``device_augment``): the index
of the image actually used, so a replaced image brings its own draws on either path.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterator

import numpy as np

from tresnet_jax.data.augment import AugmentConfig, decode_crop, train_transform
from tresnet_jax.data.host_pool import UNREADABLE, HostCost, ordered_map, stack_rows
from tresnet_jax.data.sources import Label, LabelMap, Source, SyntheticSource
from tresnet_jax.errors import InputError, reason_of

# Consecutive unreadable images after which the dataset is taken to be broken, not the image.
MAX_CONSECUTIVE_UNREADABLE = 32


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


@dataclasses.dataclass(frozen=True)
class Augmented:
    """One training example, and the images that had to be passed over to make it."""

    image: np.ndarray
    label: Label
    unreadable: tuple[tuple[int, str], ...] = ()  # (index, reason)
    index: int = -1  # the image used (``index`` or the readable one that replaced it)


def host_crop(encoded: bytes, seed: tuple[int, ...], augment: AugmentConfig, name: str) -> np.ndarray:
    """The host's part when the device augments: the crop of ``train_transform``, same draws."""
    return np.asarray(decode_crop(encoded, name, np.random.default_rng(seed), augment))


def augmented_example(
    source: Source, augment: AugmentConfig, seed: int, epoch: int, index: int, on_device: bool = False
) -> Augmented:
    """Image ``index`` augmented with the draws of (seed, epoch, index) (``on_device``: only
    cropped); if it cannot be read, the next readable image of the dataset, with its own draws."""
    transform = host_crop if on_device else train_transform
    unreadable = []
    for offset in range(MAX_CONSECUTIVE_UNREADABLE):
        candidate = (index + offset) % len(source)
        try:
            encoded, label = source.record(candidate)
            image = transform(encoded, (seed, epoch, candidate), augment, source.describe(candidate))
        except UNREADABLE as err:
            unreadable.append((candidate, reason_of(err)))
            continue
        return Augmented(image, label, tuple(unreadable), candidate)
    raise InputError(
        f"{source.name}: {MAX_CONSECUTIVE_UNREADABLE} consecutive unreadable images from "
        f"{source.describe(index)} on (last: {unreadable[-1][1]}); the dataset looks damaged"
    )


@dataclasses.dataclass(frozen=True)
class AugmentedExample:
    """(epoch, index) -> ``augmented_example`` (an object, not a closure, so that worker
    processes can be given it)."""

    source: Source
    augment: AugmentConfig
    seed: int
    on_device: bool = False

    def __call__(self, item: tuple[int, int]) -> Augmented:
        return augmented_example(self.source, self.augment, self.seed, *item, on_device=self.on_device)


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
) -> Iterator[dict[str, np.ndarray]]:
    """Endless batches {image uint8 (local batch, S, S, 3), label: ``label_map.rows``} from
    ``start_step`` (``on_device``: cropped images, and ``augment_ids`` int32 (local batch, 2));
    ``on_unreadable(image, reason)`` is called once for each image passed over; ``cost``
    accumulates the host's CPU time per image."""
    steps = steps_per_epoch(source, spec)
    first_epoch, first_step = divmod(start_step, steps)
    if isinstance(source, SyntheticSource):
        images, labels = source.batch(spec.local_batch, augment.image_size, spec.seed + spec.process_index)
        batch = {"image": images, "label": label_map.rows(labels)}
        if on_device:  # the same images every step; their augmentation differs by step
            rows = spec.process_index * spec.local_batch + np.arange(spec.local_batch)
            for step in itertools.count(start_step):
                yield {**batch, "augment_ids": np.stack([np.full_like(rows, step), rows], 1).astype(np.int32)}
        while True:
            yield batch

    def examples() -> Iterator[tuple[int, int]]:
        epoch, step = first_epoch, first_step
        while True:
            for index in host_indices(len(source), spec, epoch, step):
                yield epoch, int(index)
            epoch, step = epoch + 1, 0

    reported: set[int] = set()
    images: list[np.ndarray] = []
    labels: list[Label] = []
    ids: list[tuple[int, int]] = []
    transform = AugmentedExample(source, augment, spec.seed, on_device)
    for outcome in ordered_map(transform, examples(), workers, cost=cost):
        if outcome.error is not None:  # the whole neighbourhood is unreadable
            raise InputError(outcome.error)
        example = outcome.value
        for index, reason in example.unreadable:
            if index not in reported:
                reported.add(index)
                if on_unreadable is not None:
                    on_unreadable(source.describe(index), reason)
        images.append(example.image)
        labels.append(example.label)
        ids.append((outcome.item[0], example.index))
        if len(images) == spec.local_batch:
            batch = {"image": stack_rows(images, augment.image_size), "label": label_map.rows(labels)}
            if on_device:
                batch["augment_ids"] = np.asarray(ids, np.int32)
            yield batch
            images, labels, ids = [], [], []
