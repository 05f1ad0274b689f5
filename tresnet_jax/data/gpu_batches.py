"""The training and evaluation batch streams with their JPEGs decoded, cropped and resized by a
``gpu_decode.BatchDecoder``: the host's threads only read bytes and parse headers.

Each stream is the host's (``train_stream.train_batches``, ``evaluation.preprocessed_batches``)
with ``pipeline.Read`` leaving the JPEGs the decoder takes as ``ForDecoder`` and one more stage,
``decoded``, before the batches; their images are gathered on the decoder's device
(``device_images``). So they give the same batches, up to the JPEG decoder: what the decoder may
not be given (``jpeg_header.gpu_rejection``) or fails on goes through the host's path for its
slot, which reads it exactly as the host stream does or reports it as unreadable there.

Before a run's first stream uses the decoder, ``trusted`` decodes the first JPEGs of its first
batch both ways: a decoder whose pixels are too far from PIL's is not used, and every stream of
the run is the host's.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np

from tresnet_jax.data.augment import AugmentConfig
from tresnet_jax.data.gpu_decode import BatchDecoder, Box, _torch, resized_mismatch, to_jax
from tresnet_jax.data.host_pool import UNREADABLE, Outcome, attempt, ordered_map
from tresnet_jax.data.pipeline import (
    ForDecoder,
    Images,
    ImageWork,
    Key,
    Read,
    decodable_size,
    eval_batches_of,
    eval_examples,
    eval_keys,
    groups,
    host_images,
    train_batches_of,
    train_examples,
)
from tresnet_jax.data.preprocess import EvalTransform
from tresnet_jax.data.sources import LabelMap, Source
from tresnet_jax.data.train_stream import StreamSpec, TrainTransform, train_batches, train_keys
from tresnet_jax.preprocessing import Preprocessing

CHECKED_IMAGES = 4  # JPEGs of a run's first batch decoded both ways before its decoder is used


def first_jpegs(source: Source, work: ImageWork, keys: Iterable[Key], count: int) -> list[tuple[bytes, Box, str]]:
    """Up to ``count`` of the images of ``keys`` the decoder would be given, in order: (bytes,
    the box ``work`` draws for the key, name). Only their headers are parsed."""
    found = []
    for key in keys:
        try:
            encoded, _ = source.record(key[1])
        except UNREADABLE:  # the stream reports it
            continue
        size = decodable_size(encoded)
        if size is not None:
            found.append((encoded, work.box(size, key), source.describe(key[1])))
            if len(found) == count:
                break
    return found


def trusted(decoder: BatchDecoder, source: Source, work: ImageWork, keys: Iterable[Key]) -> bool:
    """Whether the streams may use ``decoder``'s pixels. Decided once per decoder (so once per
    run, its validations included) on the first stream's first batch (``keys``): its first
    ``CHECKED_IMAGES`` JPEGs decoded and resized by the decoder and by PIL
    (``gpu_decode.resized_mismatch``). A decoder is not trusted untried (nvJPEG had not run on a
    GPU when this was written): a mismatch prints one line and the run stays on the host's path.
    A first batch with no JPEG for the decoder leaves the decision to the next stream."""
    if not decoder.checked:
        found = first_jpegs(source, work, keys, CHECKED_IMAGES)
        if found:
            decoder.checked = True
            encoded, boxes, names = [f[0] for f in found], [f[1] for f in found], [f[2] for f in found]
            decoder.mismatch = resized_mismatch(decoder, encoded, boxes, names, work.size, work.interpolation)
            if decoder.mismatch is not None:
                print(f"JPEG decoding stays on the host: {decoder.mismatch}", flush=True)
    return decoder.mismatch is None


def decoded(
    outcomes: Iterable[Outcome], decoder: BatchDecoder, work: ImageWork, host: Read, group: int
) -> Iterator[Outcome]:
    """The outcomes of ``Read(..., for_decoder=True)`` with their ``ForDecoder`` images decoded
    and resized by ``decoder``, ``group`` outcomes at a time in one call; an image it refuses
    is read again by ``host`` (the same ``Read`` on the host's path) in its place."""
    for chunk in groups(outcomes, group):
        waiting = [n for n, o in enumerate(chunk) if o.error is None and isinstance(o.value[0], ForDecoder)]
        rows, refused = decoder.decode_resized(
            [chunk[n].value[0].encoded for n in waiting],
            [chunk[n].value[0].box for n in waiting],
            work.size,
            work.interpolation,
        )
        refused_at = {waiting[k] for k in refused}
        on_device = dict(zip([n for n in waiting if n not in refused_at], rows, strict=True))
        for n, outcome in enumerate(chunk):
            if n in refused_at:
                yield attempt(host, outcome.item)
            elif n in on_device:
                yield Outcome(outcome.item, (on_device[n], *outcome.value[1:]))
            else:
                yield outcome


def device_images(decoder: BatchDecoder, size: int) -> Images:
    """A batch's rows gathered on the decoder's device as a jax.Array: the decoded ones where
    they are, the host's numpy ones uploaded."""

    def images(rows: list[Any], total: int) -> Any:
        host_at = [n for n, row in enumerate(rows) if isinstance(row, np.ndarray)]
        device_at = [n for n, row in enumerate(rows) if not isinstance(row, np.ndarray)]
        host = np.stack([rows[n] for n in host_at]) if host_at else None
        device = _torch().stack([rows[n] for n in device_at]) if device_at else None
        return to_jax(decoder.gather(total, size, device, device_at, host, host_at))

    return images


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
    ``image`` is a jax.Array uint8 (local batch, S, S, 3) on the decoder's device. A decoder
    not ``trusted`` gives way to the host's stream (numpy images)."""
    work = TrainTransform(augment, spec.seed, crop_only=True)
    if not trusted(decoder, source, work, itertools.islice(train_keys(source, spec, start_step), spec.local_batch)):
        yield from train_batches(source, spec, augment, start_step, label_map, on_unreadable, workers, on_device=True)
        return
    keys = train_keys(source, spec, start_step)
    # Threads: each item is a file read and a header parse; processes would ship the bytes back.
    reads = ordered_map(Read(source, work, replace=True, for_decoder=True), keys, workers, 2 * spec.local_batch, False)
    outcomes = decoded(reads, decoder, work, Read(source, work, replace=True), spec.local_batch)
    examples = train_examples(outcomes, source.describe, on_unreadable)
    yield from train_batches_of(examples, spec.local_batch, device_images(decoder, work.size), label_map, True)


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
    decoder saves; ``label``, ``mask`` and ``index`` stay numpy, as the host reads them. A decoder
    not ``trusted``: ``evaluation.preprocessed_batches``'s stages, numpy images."""
    work = EvalTransform(prep)
    if trusted(decoder, source, work, eval_keys(start, min(end, start + local_batch))):
        keys = eval_keys(start, end)
        reads = ordered_map(Read(source, work, for_decoder=True), keys, workers, 2 * local_batch, False)
        examples = eval_examples(decoded(reads, decoder, work, Read(source, work), local_batch), skipped)
        images = device_images(decoder, work.size)
    else:
        examples = eval_examples(ordered_map(Read(source, work), eval_keys(start, end), workers), skipped)
        images = host_images(work.size)
    yield from eval_batches_of(examples, local_batch, steps, images, label_map)
