"""The training and evaluation batch streams with their JPEGs decoded, cropped and resized by a
``gpu_decode.BatchDecoder``: the host's threads only read bytes and parse headers.

Each stream gives the same batches as the host's (``train_stream.train_batches``,
``evaluation.preprocessed_batches``), up to the JPEG decoder. What the decoder may not be given
(``jpeg_header.gpu_rejection``) or fails on goes through the host's path for its slot, which
reads it exactly as the host stream does or reports it as unreadable there. For evaluation the
box resized is the part of the image that ``pil_transform``'s resize and centre crop keep
(``eval_box``).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from tresnet_jax.data.augment import AugmentConfig, crop_box
from tresnet_jax.data.gpu_decode import BatchDecoder, Box, _torch, to_jax
from tresnet_jax.data.host_pool import UNREADABLE, ordered_map
from tresnet_jax.data.jpeg_header import gpu_rejection, header_size
from tresnet_jax.data.preprocess import PIL_ERRORS, Preprocessing, decode_pil, padded_rows, pil_transform
from tresnet_jax.data.sources import Label, LabelMap, Source, SyntheticSource
from tresnet_jax.data.train_stream import (
    Augmented,
    StreamSpec,
    augmented_example,
    host_indices,
    steps_per_epoch,
    train_batches,
)
from tresnet_jax.errors import InputError, reason_of

if TYPE_CHECKING:
    import torch


@dataclasses.dataclass(frozen=True)
class _Pending:
    """An image read and its header parsed, waiting for the decoder."""

    encoded: bytes
    label: Label
    box: Box
    index: int


@dataclasses.dataclass(frozen=True)
class _TrainRead:
    """(epoch, index) -> the bytes and crop box of image ``index``, or, for what the decoder
    cannot take, the host's crop (``augmented_example``: unreadable images replaced there)."""

    source: Source
    augment: AugmentConfig
    seed: int

    def __call__(self, item: tuple[int, int]) -> _Pending | Augmented:
        epoch, index = item
        try:
            encoded, label = self.source.record(index)
            size = header_size(encoded) if gpu_rejection(encoded) is None else None
        except UNREADABLE:
            size = None
        if size is None:
            return augmented_example(self.source, self.augment, self.seed, epoch, index, on_device=True)
        box = crop_box(
            size, np.random.default_rng((self.seed, epoch, index)), self.augment.crop_scale, self.augment.crop_ratio
        )
        return _Pending(encoded, label, (0, 0, *size) if self.augment.squish else box, index)


def decoded_train_batches(
    source: Source,
    spec: StreamSpec,
    augment: AugmentConfig,
    start_step: int,
    label_map: LabelMap,
    decoder: BatchDecoder,
    on_unreadable: Callable[[str, str], None] | None = None,
    workers: int | None = None,
) -> Iterator[dict[str, Any]]:
    """``train_stream.train_batches(..., on_device=True)`` with the crops decoded and resized by
    ``decoder``: the same images (up to the JPEG decoder), labels, ``augment_ids`` and reports;
    ``image`` is a jax.Array uint8 (local batch, S, S, 3) on the decoder's device."""
    if isinstance(source, SyntheticSource):  # nothing to decode
        for batch in train_batches(source, spec, augment, start_step, label_map, on_unreadable, workers, True):
            yield {**batch, "image": to_jax(decoder.upload(batch["image"]))}
        return
    steps = steps_per_epoch(source, spec)
    first_epoch, first_step = divmod(start_step, steps)

    def examples() -> Iterator[tuple[int, int]]:
        for epoch in itertools.count(first_epoch):
            for index in host_indices(len(source), spec, epoch, first_step if epoch == first_epoch else 0):
                yield epoch, int(index)

    reported: set[int] = set()
    slots: list[_Pending | Augmented] = []
    epochs: list[int] = []
    # Threads: each item is a file read and a header parse; processes would ship the bytes back.
    reads = ordered_map(_TrainRead(source, augment, spec.seed), examples(), workers, 2 * spec.local_batch, False)
    for outcome in reads:
        if outcome.error is not None:  # the whole neighbourhood is unreadable
            raise InputError(outcome.error)
        slots.append(outcome.value)
        epochs.append(outcome.item[0])
        if len(slots) < spec.local_batch:
            continue
        pending = [i for i, slot in enumerate(slots) if isinstance(slot, _Pending)]
        decoded, rejected = decoder.decode_resized(
            [slots[i].encoded for i in pending], [slots[i].box for i in pending], augment.image_size
        )
        for n in (pending[k] for k in rejected):  # the host's crop, or the next readable image
            slots[n] = augmented_example(source, augment, spec.seed, epochs[n], slots[n].index, True)
        for slot in slots:
            for index, reason in slot.unreadable if isinstance(slot, Augmented) else ():
                if index not in reported:
                    reported.add(index)
                    if on_unreadable is not None:
                        on_unreadable(source.describe(index), reason)
        refused = {pending[k] for k in rejected}
        decoded_at = [n for n in pending if n not in refused]
        host_at = [n for n, slot in enumerate(slots) if isinstance(slot, Augmented)]
        host = np.stack([slots[n].image for n in host_at]) if host_at else None
        images = decoder.gather(spec.local_batch, augment.image_size, decoded, decoded_at, host, host_at)
        yield {
            "image": to_jax(images),
            "label": label_map.rows([slot.label for slot in slots]),
            "augment_ids": np.asarray([(e, slot.index) for e, slot in zip(epochs, slots, strict=True)], np.int32),
        }
        slots, epochs = [], []


def eval_box(size: tuple[int, int], prep: Preprocessing) -> Box:
    """The region of an image of ``size`` (width, height) that ``pil_transform`` keeps: its
    resize of the shorter side to ``resize_size`` then centre crop is PIL's resize of this box
    to input_size x input_size (the same taps); squish: the whole image."""
    width, height = size
    if prep.squish:
        return (0.0, 0.0, float(width), float(height))
    scale = prep.resize_size / min(width, height)
    target = (
        (math.floor(width * scale), prep.resize_size)
        if height <= width
        else (prep.resize_size, math.floor(height * scale))
    )
    crop = prep.input_size
    left, top = round((target[0] - crop) / 2), round((target[1] - crop) / 2)
    x, y = width / target[0], height / target[1]
    return (left * x, top * y, (left + crop) * x, (top + crop) * y)


@dataclasses.dataclass(frozen=True)
class _EvalRead:
    """index -> the bytes and box of image ``index``, or, for what the decoder cannot take,
    ``pil_transform``'s row (unreadable: the error, which the stream records as skipped)."""

    source: Any
    prep: Preprocessing

    def __call__(self, index: int) -> tuple[Label, _Pending | np.ndarray]:
        encoded, label = self.source.record(index)
        try:
            size = header_size(encoded) if gpu_rejection(encoded) is None else None
        except PIL_ERRORS:
            size = None
        if size is None:
            return label, pil_transform(decode_pil(encoded, self.source.describe(index)), self.prep)
        return label, _Pending(encoded, label, eval_box(size, self.prep), index)


def decoded_eval_batches(
    source: Any,
    prep: Preprocessing,
    start: int,
    end: int,
    label_map: LabelMap,
    local_batch: int,
    steps: int,
    skipped: dict[int, str],
    decoder: BatchDecoder,
    workers: int | None = None,
) -> Iterator[dict[str, Any]]:
    """``evaluation.preprocessed_batches`` with the images decoded and resized by ``decoder``:
    exactly ``steps`` batches, the same rows, ``mask``, ``index``, labels and ``skipped``.

    ``image`` is a jax.Array on the decoder's device (padding rows zero), not numpy: the rows are
    made there and go to the model there, and a copy to the host and back would cost what the
    decoder saves; ``label``, ``mask`` and ``index`` stay numpy, as the host reads them."""
    size = prep.input_size
    if isinstance(source, SyntheticSource):
        images, labels = source.batch(local_batch, size, start)
        for first in range(start, start + steps * local_batch, local_batch):
            n = max(0, min(end - first, local_batch))
            padded = decoder.gather(local_batch, size, None, [], images[:n], range(n))
            yield _eval_batch(padded, label_map.rows(labels[:n]), range(first, first + n), local_batch)
        return

    entries: list[tuple[int, Label, Any]] = []  # (index, label, host row | device row | _Pending)
    emitted = 0
    reads = ordered_map(_EvalRead(source, prep), range(start, end), workers, 2 * local_batch, False)
    for outcome in itertools.chain(reads, [None]):
        if outcome is not None:
            if outcome.error is not None:
                skipped[outcome.item] = outcome.error
                continue
            entries.append((outcome.item, *outcome.value))
            if len(entries) < local_batch:
                continue
        # Full, or the end: decode; an image neither the decoder nor PIL reads leaves a gap to fill.
        entries = _decode_entries(entries, decoder, prep, source, skipped)
        if len(entries) == local_batch or (outcome is None and entries):
            yield _eval_entries_batch(decoder, entries, label_map, size, local_batch)
            entries = []
            emitted += 1
    for _ in range(emitted, steps):
        yield _eval_batch(decoder.gather(local_batch, size, None, [], None, []), label_map.empty(0), [], local_batch)


def _decode_entries(
    entries: list[tuple[int, Label, Any]], decoder: BatchDecoder, prep: Preprocessing, source: Any, skipped: dict
) -> list[tuple[int, Label, Any]]:
    """The entries with their pending images decoded on the device, or by PIL where the decoder
    refuses them; an image PIL cannot read either goes to ``skipped`` and out of the list."""
    pending = [n for n, entry in enumerate(entries) if isinstance(entry[2], _Pending)]
    decoded, rejected = decoder.decode_resized(
        [entries[n][2].encoded for n in pending],
        [entries[n][2].box for n in pending],
        prep.input_size,
        prep.interpolation,
    )
    refused = {pending[k] for k in rejected}
    on_device = dict(zip([n for n in pending if n not in refused], decoded, strict=True))
    kept = []
    for n, (index, label, row) in enumerate(entries):
        if n in on_device:
            row = on_device[n]
        elif n in refused:
            try:
                row = pil_transform(decode_pil(row.encoded, source.describe(index)), prep)
            except UNREADABLE as err:
                skipped[index] = reason_of(err)
                continue
        kept.append((index, label, row))
    return kept


def _eval_entries_batch(
    decoder: BatchDecoder, entries: list[tuple[int, Label, Any]], label_map: LabelMap, size: int, rows: int
) -> dict[str, Any]:
    device_at = [n for n, entry in enumerate(entries) if not isinstance(entry[2], np.ndarray)]
    host_at = [n for n, entry in enumerate(entries) if isinstance(entry[2], np.ndarray)]
    device_rows = _torch().stack([entries[n][2] for n in device_at]) if device_at else None
    host_rows = np.stack([entries[n][2] for n in host_at]) if host_at else None
    padded = decoder.gather(rows, size, device_rows, device_at, host_rows, host_at)
    return _eval_batch(padded, label_map.rows([entry[1] for entry in entries]), [entry[0] for entry in entries], rows)


def _eval_batch(padded: torch.Tensor, labels: np.ndarray, indices: Sequence[int], rows: int) -> dict[str, Any]:
    """An evaluation batch (``evaluation.pad_batch``'s columns) for images already padded on the device."""
    return {"image": to_jax(padded), **padded_rows(labels, indices, rows)}
