"""Exact, data-parallel evaluation: every image counted once on any number of devices, hosts
and any batch size (the last batch is padded and masked), corrupt images skipped and listed."""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tresnet_jax.errors import InputError
from tresnet_jax.parallel import BATCH_AXIS, local_batch_size, local_rows, prefetch_to_devices, replicate
from tresnet_jax.preprocess import Preprocessing, decode_image, decode_with_fallback, tensorflow, transform
from tresnet_jax.xla_options import compiler_options, precision_scope

Batch = dict[str, np.ndarray]
TOTALS = ("count", "top1", "top5", "loss")


@dataclasses.dataclass
class EvalResult:
    """Metrics over every image that could be read, and what could not."""

    num_images: int
    top1: float  # percent
    top5: float  # percent
    loss: float  # mean cross-entropy
    compile_seconds: float
    wall_seconds: float  # the evaluation loop, after compilation
    skipped: list[tuple[str, str]]  # (image, reason)
    logits: np.ndarray | None = None  # (dataset size, classes), dataset order, NaN rows for skipped
    labels: np.ndarray | None = None  # model class of each image

    @property
    def images_per_second(self) -> float:
        return self.num_images / self.wall_seconds if self.wall_seconds > 0 else 0.0

    def metrics(self) -> dict[str, Any]:
        return {
            "images": self.num_images,
            "top1": self.top1,
            "top5": self.top5,
            "loss": self.loss,
            "images_per_second": self.images_per_second,
            "compile_seconds": self.compile_seconds,
            "wall_seconds": self.wall_seconds,
            "skipped": len(self.skipped),
        }


def make_eval_step(model: Any, mesh: Mesh, keep_logits: bool) -> Callable:
    """The per-device program: logits of its shard, masked sums reduced over all devices."""

    def per_device(variables, batch):
        with precision_scope(model.dtype):  # a float32 model in true float32 (not TF32) on a GPU
            logits = model.apply(variables, batch["image"].astype(jnp.float32) / 255.0)
        labels, mask = batch["label"], batch["mask"].astype(jnp.float32)
        k = min(5, logits.shape[-1])
        top = lax.top_k(logits, k)[1]
        loss = -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=-1)[:, 0]
        sums = {
            "count": mask.sum(),
            "top1": ((top[:, 0] == labels) * mask).sum(),
            "top5": (jnp.any(top == labels[:, None], axis=-1) * mask).sum(),
            "loss": (loss * mask).sum(),
        }
        return lax.psum(sums, BATCH_AXIS), ({"logits": logits} if keep_logits else {})

    out_specs = (PartitionSpec(), {"logits": PartitionSpec(BATCH_AXIS)} if keep_logits else {})
    sharded = jax.shard_map(
        per_device, mesh=mesh, in_specs=(PartitionSpec(), PartitionSpec(BATCH_AXIS)), out_specs=out_specs
    )
    return jax.jit(sharded, compiler_options=compiler_options())


@functools.lru_cache(maxsize=8)
def compiled_eval_step(model: Any, mesh: Mesh, keep_logits: bool, local_batch: int, image_size: int):
    """The compiled step, kept for the next evaluation of the same shapes (every epoch of a
    training run)."""
    abstract_variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    sharding = NamedSharding(mesh, PartitionSpec())
    abstract_variables = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), abstract_variables
    )
    step = make_eval_step(model, mesh, keep_logits)
    return step.lower(abstract_variables, batch_spec(local_batch, image_size, mesh)).compile()


def batch_spec(local_batch: int, image_size: int, mesh: Mesh) -> dict[str, jax.ShapeDtypeStruct]:
    """The global shapes of one batch, for compiling ahead of the first batch."""
    sharding = NamedSharding(mesh, PartitionSpec(BATCH_AXIS))
    n = local_batch * jax.process_count()
    return {
        "image": jax.ShapeDtypeStruct((n, image_size, image_size, 3), jnp.uint8, sharding=sharding),
        "label": jax.ShapeDtypeStruct((n,), jnp.int32, sharding=sharding),
        "mask": jax.ShapeDtypeStruct((n,), jnp.bool_, sharding=sharding),
        "index": jax.ShapeDtypeStruct((n,), jnp.int32, sharding=sharding),
    }


def host_range(size: int) -> tuple[int, int]:
    """The contiguous slice of the dataset this process evaluates."""
    per_host = math.ceil(size / jax.process_count())
    start = min(size, jax.process_index() * per_host)
    return start, min(size, start + per_host)


def decoded_batches(source: Any, prep: Preprocessing, start: int, end: int, local_batch: int) -> Iterator[Batch]:
    """Preprocessed images [start, end) in parallel (tf.data), in batches of up to
    ``local_batch``; images that fail to decode are dropped here and retried later."""
    tf = tensorflow()

    def load(encoded, label, index):
        return {"image": transform(decode_image(encoded), prep), "label": label, "index": index}

    load = tf.autograph.experimental.do_not_convert(load)  # plain TF ops: nothing to convert
    data = source.encoded(start, end).map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
    data = data.ignore_errors().batch(local_batch).prefetch(tf.data.AUTOTUNE)
    return data.as_numpy_iterator()


def padded(batches: Iterator[Batch], label_map: np.ndarray, local_batch: int, steps: int, size: int) -> Iterator[Batch]:
    """Exactly ``steps`` batches of ``local_batch`` rows: labels in model classes, a ``mask`` of
    real rows, empty batches at the end so every process runs the same number of steps."""
    emitted = 0
    for batch in batches:
        yield pad_batch(batch["image"], label_map[batch["label"]], batch["index"], local_batch)
        emitted += 1
    empty = np.zeros((0, size, size, 3), np.uint8)
    for _ in range(emitted, steps):
        yield pad_batch(empty, np.zeros(0, np.int64), np.zeros(0, np.int64), local_batch)


def pad_batch(images: np.ndarray, labels: np.ndarray, indices: np.ndarray, rows: int) -> Batch:
    n = len(images)
    pad = rows - n
    return {
        "image": np.concatenate([images, np.zeros((pad, *images.shape[1:]), np.uint8)]),
        "label": np.concatenate([labels, np.zeros(pad, labels.dtype)]).astype(np.int32),
        "mask": np.arange(rows) < n,
        "index": np.concatenate([indices, np.full(pad, -1, indices.dtype)]).astype(np.int32),
    }


def retry_with_fallback(source: Any, prep: Preprocessing, missing: list[int], label_map: np.ndarray):
    """Images the fast path could not decode, decoded by the fallback: (their batch rows,
    {index: reason} of those that cannot be read at all)."""
    tf = tensorflow()
    images, labels, indices, skipped = [], [], [], {}
    for index in missing:
        name = source.describe(index)
        try:
            image = decode_with_fallback(source.read_encoded(index), name)
            images.append(transform(tf.convert_to_tensor(image), prep).numpy())
        except InputError as err:
            skipped[index] = str(err).removeprefix(f"{name}: ")
            continue
        except OSError as err:
            skipped[index] = err.strerror or str(err)
            continue
        labels.append(int(source_label(source, index)))
        indices.append(index)
    size = prep.input_size
    rows = (
        np.asarray(images, np.uint8).reshape(-1, size, size, 3),
        label_map[np.asarray(labels, np.int64)],
        np.asarray(indices, np.int64),
    )
    return rows, skipped


def source_label(source: Any, index: int) -> int:
    if hasattr(source, "labels"):
        return int(source.labels[index])
    (_, label, _), = source.encoded(index, index + 1).as_numpy_iterator()
    return int(label)


def evaluate(
    model: Any,
    variables: Any,
    source: Any,
    prep: Preprocessing,
    label_map: np.ndarray,
    global_batch: int,
    mesh: Mesh,
    keep_logits: bool = False,
    progress: Callable[[int, dict[str, float]], None] | None = None,
) -> EvalResult:
    """Evaluate ``model`` on every image of ``source``; ``progress(images, metrics)`` is called
    after each step (metrics only every few steps, as reading them waits for the devices)."""
    local_batch = local_batch_size(global_batch, mesh)
    start, end = host_range(len(source))
    steps = math.ceil(math.ceil(len(source) / jax.process_count()) / local_batch)
    variables = replicate(variables, mesh)
    compile_start = time.perf_counter()  # nearly 0 when the same step was compiled before
    compiled = compiled_eval_step(model, mesh, keep_logits, local_batch, prep.input_size)
    compile_seconds = time.perf_counter() - compile_start

    tracker = _Tracker(len(source), model.num_classes if keep_logits else 0)
    loop_start = time.perf_counter()
    rows = decoded_batches(source, prep, start, end, local_batch)
    tracker.run(compiled, variables, padded(rows, label_map, local_batch, steps, prep.input_size), mesh, progress)

    # The fast path drops what it cannot decode; retry those with the fallback decoder.
    missing = [i for i in range(start, end) if not tracker.seen[i]]
    retried, skipped = retry_with_fallback(source, prep, missing, label_map)
    retry_steps = math.ceil(len(retried[0]) / local_batch)
    retry_steps = int(multihost_utils.process_allgather(np.asarray(retry_steps)).max())
    batches = (
        pad_batch(*(rows[i : i + local_batch] for rows in retried), local_batch)
        for i in range(0, retry_steps * local_batch, local_batch)
    )
    tracker.run(compiled, variables, batches, mesh, progress)
    wall_seconds = time.perf_counter() - loop_start
    return tracker.result(compile_seconds, wall_seconds, skipped, source.describe)


class _Tracker:
    """Accumulates device totals, which images were seen, and (optionally) their logits."""

    def __init__(self, size: int, num_classes: int):
        self.seen = np.zeros(size, bool)
        self.totals: dict[str, jax.Array] | None = None
        self.logits = np.full((size, num_classes), np.nan, np.float32) if num_classes else None
        self.labels = np.full(size, -1, np.int64)
        self.images = 0

    def run(self, compiled, variables, batches, mesh, progress) -> None:
        pending = []
        for number, (host, device) in enumerate(prefetch_to_devices(batches, mesh)):
            totals, outputs = compiled(variables, device)
            self.totals = totals if self.totals is None else jax.tree_util.tree_map(jnp.add, self.totals, totals)
            real = host["mask"]
            self.seen[host["index"][real]] = True
            self.labels[host["index"][real]] = host["label"][real]
            self.images += int(real.sum())
            if self.logits is not None:
                pending.append((host, outputs["logits"]))
                if len(pending) > 2:  # fetch with a lag, so the devices keep working
                    self._store(*pending.pop(0))
            if progress is not None:
                progress(self.images, self.running() if number % 10 == 9 else {})
        for item in pending:
            self._store(*item)

    def _store(self, host: Batch, logits: jax.Array) -> None:
        real = host["mask"]
        self.logits[host["index"][real]] = local_rows(logits)[real]

    def running(self) -> dict[str, float]:
        totals = jax.device_get(self.totals)
        count = max(float(totals["count"]), 1.0)
        return {"top1": 100 * float(totals["top1"]) / count, "top5": 100 * float(totals["top5"]) / count}

    def result(
        self, compile_seconds: float, wall_seconds: float, reasons: dict[int, str], describe: Callable[[int], str]
    ) -> EvalResult:
        totals = {k: float(v) for k, v in jax.device_get(self.totals).items()}
        seen = multihost_utils.process_allgather(self.seen).reshape(-1, self.seen.size)
        if int(totals["count"]) != int(seen.sum()) or int(seen.sum(0).max(initial=0)) > 1:
            raise RuntimeError(f"evaluation miscounted: {totals['count']} counted, {seen.sum()} images seen")
        logits, labels = self.logits, self.labels
        if jax.process_count() > 1:  # each image was evaluated by exactly one process
            labels = multihost_utils.process_allgather(labels).reshape(-1, labels.size).max(0)
            if logits is not None:
                logits = np.fmax.reduce(multihost_utils.process_allgather(logits).reshape(-1, *logits.shape), axis=0)
        skipped = [
            (describe(int(i)), reasons.get(int(i), "unreadable (reported by another process)"))
            for i in np.flatnonzero(~seen.any(0))
        ]
        count = max(totals["count"], 1.0)
        return EvalResult(
            num_images=int(totals["count"]),
            top1=100 * totals["top1"] / count,
            top5=100 * totals["top5"] / count,
            loss=totals["loss"] / count,
            compile_seconds=compile_seconds,
            wall_seconds=wall_seconds,
            skipped=skipped,
            logits=logits,
            labels=labels,
        )
