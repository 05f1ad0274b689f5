"""The training input stream: deterministic per (seed, step), resumable at any step, and split
across processes so that every process count sees the same global batches.

Folder datasets are read by index: each epoch is a seeded permutation of the images, global
batch ``k`` is its ``k``-th slice, and process ``p`` takes the ``p``-th part of that slice. A
TFDS dataset prepared on disk is streamed instead (TFDS files are not randomly accessible):
its per-process part is shuffled with fixed seeds, and resuming skips the records already
consumed, so it is exact for the same number of processes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np

from tresnet_jax.augment import AugmentConfig, train_transform
from tresnet_jax.datasets import FolderSource, TfdsSource
from tresnet_jax.errors import InputError
from tresnet_jax.preprocess import decode_image, tensorflow

SHUFFLE_BUFFER = 16_384


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


def steps_per_epoch(source: FolderSource | TfdsSource, spec: StreamSpec) -> int:
    """Full global batches per epoch (the incomplete last one is dropped in training)."""
    if isinstance(source, FolderSource):
        steps = len(source) // spec.global_batch
    else:
        steps = (len(source) // spec.process_count) // spec.local_batch
    if steps == 0:
        raise InputError(f"{source.name} has {len(source)} images: fewer than one batch of {spec.global_batch}")
    return steps


def epoch_order(seed: int, epoch: int, size: int) -> np.ndarray:
    """The image order of one epoch."""
    return np.random.default_rng([seed, epoch]).permutation(size)


def host_indices(source: FolderSource, spec: StreamSpec, epoch: int, first_step: int = 0) -> np.ndarray:
    """This process's image indices for the steps of ``epoch`` from ``first_step`` on."""
    steps = steps_per_epoch(source, spec)
    order = epoch_order(spec.seed, epoch, len(source))[: steps * spec.global_batch]
    per_step = order.reshape(steps, spec.process_count, spec.local_batch)
    return per_step[first_step:, spec.process_index].reshape(-1)


def train_batches(
    source: FolderSource | TfdsSource, spec: StreamSpec, augment: AugmentConfig, start_step: int, label_map: np.ndarray
) -> Iterator[dict[str, np.ndarray]]:
    """Endless batches {image uint8 (local batch, S, S, 3), label int32} from ``start_step``."""
    tf = tensorflow()
    steps = steps_per_epoch(source, spec)
    epoch, skip = divmod(start_step, steps)
    if isinstance(source, FolderSource):
        data = _folder_examples(source, spec, epoch, skip)
    else:
        data = _tfds_examples(source, spec, epoch * steps * spec.local_batch + skip * spec.local_batch)
    labels = tf.constant(label_map, tf.int64)

    def load(encoded, label, seed):
        image = train_transform(decode_image(encoded), seed, augment)
        return {"image": image, "label": tf.cast(tf.gather(labels, label), tf.int32)}

    data = data.map(tf.autograph.experimental.do_not_convert(load), num_parallel_calls=tf.data.AUTOTUNE)
    options = tf.data.Options()
    options.deterministic = True
    data = data.batch(spec.local_batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE).with_options(options)
    return data.as_numpy_iterator()


def _folder_examples(source: FolderSource, spec: StreamSpec, epoch: int, skip: int):
    """(encoded, label, seed) by index, epoch after epoch; the seed is (run seed, epoch, index)."""
    tf = tensorflow()

    def epochs():
        current, first = epoch, skip
        while True:
            yield host_indices(source, spec, current, first), current
            current, first = current + 1, 0

    files = tf.constant(source.files)
    labels = tf.constant(source.labels)
    signature = (tf.TensorSpec([None], tf.int64), tf.TensorSpec([], tf.int64))
    orders = tf.data.Dataset.from_generator(epochs, output_signature=signature)
    indices = orders.flat_map(lambda idx, ep: tf.data.Dataset.from_tensor_slices((idx, tf.fill(tf.shape(idx), ep))))

    def read(index, ep):
        seed = tf.stack([tf.constant(spec.seed, tf.int64), ep * len(source) + index])
        return tf.io.read_file(tf.gather(files, index)), tf.gather(labels, index), seed

    return indices.map(tf.autograph.experimental.do_not_convert(read), num_parallel_calls=tf.data.AUTOTUNE)


def _tfds_examples(source: TfdsSource, spec: StreamSpec, skip: int):
    """(encoded, label, seed) streamed from this process's part of the split, reshuffled every
    epoch with fixed seeds; the seed is (run seed, position in this process's stream)."""
    import tensorflow_datasets as tfds

    tf = tensorflow()
    size = len(source) // spec.process_count
    split = f"{source.split}[{spec.process_index * size}:{(spec.process_index + 1) * size}]"
    read_config = tfds.ReadConfig(shuffle_seed=spec.seed, shuffle_reshuffle_each_iteration=True)
    data = source.builder.as_dataset(
        split=split, shuffle_files=True, read_config=read_config, decoders={"image": tfds.decode.SkipDecoding()}
    )
    data = data.repeat().shuffle(min(SHUFFLE_BUFFER, size), seed=spec.seed + 1, reshuffle_each_iteration=True)
    data = data.enumerate().skip(skip)

    def unpack(position, example):
        seed = tf.stack([tf.constant(spec.seed, tf.int64) + 1000003 * spec.process_index, position])
        return example["image"], tf.cast(example["label"], tf.int64), seed

    return data.map(tf.autograph.experimental.do_not_convert(unpack))
