"""The stages every input stream is made of. Training and evaluation, on the host's cores or with
a GPU decoder, are four compositions of them (``train_stream.train_batches``,
``evaluation.preprocessed_batches``, ``gpu_batches.decoded_train_batches`` and
``decoded_eval_batches``):

1. Keys: which images, in which order, as (epoch, index): ``train_stream.train_keys`` (each
   epoch's seeded permutation, this process's part, from any step), ``eval_keys`` (a slice of
   the dataset in order).
2. Reading and per-image work, on the host pool (``host_pool.ordered_map``): ``Read`` reads
   ``source.record(index)`` (every source alike) and makes the row with an ``ImageWork``
   (``train_stream.TrainTransform``, ``preprocess.EvalTransform``), or leaves a JPEG the GPU
   decoder takes as ``ForDecoder``. It returns a plain tuple, the only kind of value the pool
   looks into for rows.
3. (GPU decoder only) ``gpu_batches.decoded``: the ``ForDecoder`` images decoded in one call a
   batch; what the decoder refuses goes through ``Read``'s host path.
4. Examples: what an unreadable image becomes: in training the next readable one took its place
   in ``Read`` and it is reported once here (``train_examples``); in evaluation it is skipped
   and recorded (``eval_examples``).
5. Batches: ``train_batches_of`` (full local batches) and ``eval_batches_of`` (the last padded
   and masked, then empty batches up to the step count every process runs), their images stacked
   on the host (``host_images``) or on the decoder's device (``gpu_batches.device_images``).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, TypeVar

import numpy as np

from tresnet_jax.data.host_pool import UNREADABLE, Outcome, stack_rows
from tresnet_jax.data.jpeg_header import gpu_rejection, header_size
from tresnet_jax.data.preprocess import PIL_ERRORS
from tresnet_jax.data.sources import Label, LabelMap, Source
from tresnet_jax.errors import InputError, reason_of

if TYPE_CHECKING:
    from tresnet_jax.data.gpu_decode import Box

T = TypeVar("T")
Key = tuple[int, int]  # (epoch, image index): what an image's random draws come from
Batch = dict[str, Any]
# The images of a batch (its rows, and how many rows it has) -> its image array, zeros below.
Images = Callable[[list[Any], int], Any]
# Consecutive unreadable images after which the dataset is taken to be broken, not the image.
MAX_CONSECUTIVE_UNREADABLE = 32


class ImageWork(Protocol):
    """What the host does with an image's bytes: its row, or for the GPU decoder the box of the
    image it resizes to ``size``; both drawn from the image's key alone."""

    @property
    def size(self) -> int: ...

    @property
    def interpolation(self) -> str: ...

    def row(self, encoded: bytes, name: str, key: Key) -> np.ndarray: ...

    def box(self, size: tuple[int, int], key: Key) -> Box: ...


@dataclasses.dataclass(frozen=True)
class ForDecoder:
    """A JPEG left to the GPU decoder: its bytes and the box to resize."""

    encoded: bytes
    box: Box


def eval_keys(start: int, end: int) -> Iterator[Key]:
    """Images [start, end) in dataset order (evaluation has one epoch, 0)."""
    return ((0, index) for index in range(start, end))


@dataclasses.dataclass(frozen=True)
class Read:
    """key -> (row, label, key of the image used, images passed over as (index, reason)):
    ``source.record(index)`` made a row by ``work``. ``replace`` (training): an image that cannot
    be read gives its place to the next readable one, with its own draws; without, it raises.
    ``for_decoder``: a JPEG the decoder takes is left as ``ForDecoder``. An object, not a
    closure, so that worker processes can be given it."""

    source: Source
    work: ImageWork
    replace: bool = False
    for_decoder: bool = False

    def __call__(self, key: Key) -> tuple[np.ndarray | ForDecoder, Label, Key, tuple[tuple[int, str], ...]]:
        epoch, index = key
        if not self.replace:
            return (*self._one(key), key, ())
        passed_over = []
        for offset in range(MAX_CONSECUTIVE_UNREADABLE):
            candidate = (epoch, (index + offset) % len(self.source))
            try:
                return (*self._one(candidate), candidate, tuple(passed_over))
            except UNREADABLE as err:
                passed_over.append((candidate[1], reason_of(err)))
        raise InputError(
            f"{self.source.name}: {MAX_CONSECUTIVE_UNREADABLE} consecutive unreadable images from "
            f"{self.source.describe(index)} on (last: {passed_over[-1][1]}); the dataset looks damaged"
        )

    def _one(self, key: Key) -> tuple[np.ndarray | ForDecoder, Label]:
        encoded, label = self.source.record(key[1])
        size = decodable_size(encoded) if self.for_decoder else None
        if size is not None:
            return ForDecoder(encoded, self.work.box(size, key)), label
        return self.work.row(encoded, self.source.describe(key[1]), key), label


def decodable_size(encoded: bytes) -> tuple[int, int] | None:
    """The (width, height) of a JPEG the GPU decoder may be given, else None."""
    try:
        return header_size(encoded) if gpu_rejection(encoded) is None else None
    except PIL_ERRORS:
        return None


class Example(NamedTuple):
    """An image ready to be batched."""

    row: Any  # uint8 (S, S, 3): numpy on the host, or a tensor on the decoder's device
    label: Label
    key: Key  # of the image used


def train_examples(
    outcomes: Iterable[Outcome], describe: Callable[[int], str], on_unreadable: Callable[[str, str], None] | None
) -> Iterator[Example]:
    """Training: each image, or the one that took its place; ``on_unreadable(name, reason)`` is
    called once for each image passed over, and a stretch with no readable image stops the
    stream."""
    reported: set[int] = set()
    for outcome in outcomes:
        if outcome.error is not None:
            raise InputError(outcome.error)
        row, label, key, passed_over = outcome.value
        for index, reason in passed_over:
            if index not in reported:
                reported.add(index)
                if on_unreadable is not None:
                    on_unreadable(describe(index), reason)
        yield Example(row, label, key)


def eval_examples(outcomes: Iterable[Outcome], skipped: dict[int, str]) -> Iterator[Example]:
    """Evaluation: the images that could be read; the others go into ``skipped`` (index -> reason)."""
    for outcome in outcomes:
        if outcome.error is not None:
            skipped[outcome.item[1]] = outcome.error
            continue
        row, label, key, _ = outcome.value
        yield Example(row, label, key)


def groups(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Lists of ``size`` items in order, the last one shorter where they run out."""
    iterator = iter(items)
    return iter(lambda: list(itertools.islice(iterator, size)), [])


def host_images(size: int) -> Images:
    """A batch's numpy rows stacked on the host."""
    return lambda rows, total: stack_rows(rows, size, total)


def train_batches_of(
    examples: Iterable[Example], local_batch: int, images: Images, label_map: LabelMap, augment_ids: bool
) -> Iterator[Batch]:
    """Endless batches {image (local batch, S, S, 3), label: ``label_map.rows``}, and with
    ``augment_ids`` each image's key, int32 (local batch, 2), for the device's augmentation."""
    for group in groups(examples, local_batch):
        batch = {
            "image": images([e.row for e in group], local_batch),
            "label": label_map.rows([e.label for e in group]),
        }
        if augment_ids:
            batch["augment_ids"] = np.asarray([e.key for e in group], np.int32)
        yield batch


def eval_batches_of(
    examples: Iterable[Example], local_batch: int, steps: int, images: Images, label_map: LabelMap
) -> Iterator[Batch]:
    """Exactly ``steps`` batches (``eval_batch``) of ``local_batch`` rows: the examples in order,
    the last batch padded, then empty ones, so that every process runs the same steps."""
    emitted = 0
    for group in groups(examples, local_batch):
        labels, indices = label_map.rows([e.label for e in group]), [e.key[1] for e in group]
        yield eval_batch(images([e.row for e in group], local_batch), labels, indices, local_batch)
        emitted += 1
    for _ in range(emitted, steps):
        yield eval_batch(images([], local_batch), label_map.rows([]), [], local_batch)


def eval_batch(images: Any, labels: np.ndarray, indices: Sequence[int], rows: int) -> Batch:
    """An evaluation batch of ``rows`` rows, the first ``len(indices)`` real: ``images`` (already
    padded), labels (zeros below; multi-hot rows stay uint8, classes become int32), ``mask`` of
    the real rows, each row's dataset ``index`` (-1 below)."""
    n = len(indices)
    labels = labels if labels.ndim == 2 else labels.astype(np.int32)
    return {
        "image": images,
        "label": np.concatenate([labels, np.zeros((rows - n, *labels.shape[1:]), labels.dtype)]),
        "mask": np.arange(rows) < n,
        "index": np.concatenate([np.asarray(indices, np.int64), np.full(rows - n, -1, np.int64)]).astype(np.int32),
    }
