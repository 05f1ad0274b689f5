"""Exact, data-parallel evaluation: every image counted once on any number of devices, hosts
and any batch size (the last batch is padded and masked), corrupt images skipped and listed.
Images are read by index (``data.sources``) and preprocessed by a pool of host threads;
several sets of weights (a model and its EMA) are evaluated in one pass over the data.

Single-label sources give top-1, top-5 and the softmax cross-entropy, summed on the devices.
Multi-label ones give the mAP and each class's average precision, computed on the host from
the logits of every image (gathered from every process: a ranking metric cannot be summed per
batch), and the sigmoid binary cross-entropy summed over the classes.

The model is applied to all of its variables (an ML-Decoder's queries are a collection of their
own); a zero-shot ML-Decoder scores the classes whose word vectors it is given
(``class_embeddings``, replicated beside the variables), one output a row."""

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
import optax
from jax import lax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tresnet_jax.data.gpu_batches import decoded_eval_batches
from tresnet_jax.data.gpu_decode import BatchDecoder
from tresnet_jax.data.host_pool import ordered_map
from tresnet_jax.data.pipeline import Read, eval_batch, eval_batches_of, eval_examples, eval_keys, host_images
from tresnet_jax.data.preprocess import EvalTransform
from tresnet_jax.data.sources import LabelMap
from tresnet_jax.errors import InputError
from tresnet_jax.metrics import average_precision_per_class
from tresnet_jax.preprocessing import Preprocessing
from tresnet_jax.runtime.parallel import BATCH_AXIS, local_batch_size, local_rows, prefetch_to_devices, replicate
from tresnet_jax.runtime.xla_options import compiler_options

Batch = dict[str, np.ndarray]
TOTALS = ("count", "top1", "top5", "loss")


@dataclasses.dataclass
class EvalResult:
    """Metrics over every image that could be read, and what could not."""

    num_images: int
    top1: float | None  # percent; None for a multi-label source
    top5: float | None  # percent
    loss: float  # mean cross-entropy (multi-label: binary, summed over the classes)
    compile_seconds: float
    wall_seconds: float  # the evaluation loop, after compilation, first batch included
    first_batch_seconds: float  # from the loop's start until the first batch was preprocessed
    skipped: list[tuple[str, str]]  # (image, reason)
    logits: np.ndarray | None = None  # (dataset size, classes), dataset order, NaN rows for skipped
    labels: np.ndarray | None = None  # model class of each image (multi-label: multi-hot rows, -1 when skipped)
    per_class_ap: np.ndarray | None = None  # multi-label: AP of each class in percent, NaN without positives

    @property
    def mean_ap(self) -> float | None:
        """mAP in percent over the classes with a positive image (None: single-label; NaN: none)."""
        if self.per_class_ap is None:
            return None
        present = ~np.isnan(self.per_class_ap)
        return float(self.per_class_ap[present].mean()) if present.any() else float("nan")

    @property
    def images_per_second(self) -> float:
        return self.num_images / self.wall_seconds if self.wall_seconds > 0 else 0.0

    def metrics(self) -> dict[str, Any]:
        quality = {"top1": self.top1, "top5": self.top5} if self.per_class_ap is None else {"mAP": self.mean_ap}
        return {
            "images": self.num_images,
            **quality,
            "loss": self.loss,
            "images_per_second": self.images_per_second,
            "compile_seconds": self.compile_seconds,
            "first_batch_seconds": self.first_batch_seconds,
            "wall_seconds": self.wall_seconds,
            "skipped": len(self.skipped),
        }


def make_eval_step(
    model: Any, mesh: Mesh, keep_logits: bool, multi_label: bool = False, zero_shot: bool = False
) -> Callable:
    """The per-device program: logits of its shard, masked sums reduced over all devices.
    Called as ``step(variables, batch)``, or ``step(variables, batch, class_embeddings)`` when
    ``zero_shot``."""

    def per_device(variables, batch, *class_embeddings):
        images = batch["image"].astype(jnp.float32) / 255.0
        logits = model.apply(variables, images, class_embeddings=class_embeddings[0] if zero_shot else None)
        mask = batch["mask"].astype(jnp.float32)
        sums = _multi_label_sums(logits, batch["label"], mask) if multi_label else _sums(logits, batch["label"], mask)
        return lax.psum(sums, BATCH_AXIS), ({"logits": logits} if keep_logits else {})

    in_specs = (PartitionSpec(), PartitionSpec(BATCH_AXIS), *([PartitionSpec()] if zero_shot else []))
    out_specs = (PartitionSpec(), {"logits": PartitionSpec(BATCH_AXIS)} if keep_logits else {})
    sharded = jax.shard_map(per_device, mesh=mesh, in_specs=in_specs, out_specs=out_specs)
    return jax.jit(sharded, compiler_options=compiler_options())


def _sums(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> dict[str, jax.Array]:
    """Single-label: images, top-1 and top-5 hits, softmax cross-entropy, over the real rows."""
    top = lax.top_k(logits, min(5, logits.shape[-1]))[1]
    loss = -jnp.take_along_axis(jax.nn.log_softmax(logits.astype(jnp.float32)), labels[:, None], axis=-1)[:, 0]
    return {
        "count": mask.sum(),
        "top1": ((top[:, 0] == labels) * mask).sum(),
        "top5": (jnp.any(top == labels[:, None], axis=-1) * mask).sum(),
        "loss": (loss * mask).sum(),
    }


def _multi_label_sums(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> dict[str, jax.Array]:
    """Multi-label: images and the binary cross-entropy summed over the classes, over the real rows."""
    loss = optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32), labels.astype(jnp.float32)).sum(-1)
    return {"count": mask.sum(), "loss": (loss * mask).sum()}


@functools.lru_cache(maxsize=8)
def compiled_eval_step(
    model: Any,
    mesh: Mesh,
    keep_logits: bool,
    local_batch: int,
    image_size: int,
    multi_label: bool = False,
    class_embeddings_shape: tuple[int, int] | None = None,
):
    """The compiled step, kept for the next evaluation of the same shapes (every epoch of a
    training run); ``class_embeddings_shape``: a zero-shot model's (classes, word width)."""
    replicated = NamedSharding(mesh, PartitionSpec())
    embeddings = () if class_embeddings_shape is None else (jnp.zeros(class_embeddings_shape, jnp.float32),)
    init = functools.partial(model.init, class_embeddings=embeddings[0]) if embeddings else model.init
    abstract_variables = jax.eval_shape(init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    abstract_inputs = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), (abstract_variables, embeddings)
    )
    step = make_eval_step(model, mesh, keep_logits, multi_label, zero_shot=bool(embeddings))
    labels = (output_classes(model, class_embeddings_shape),) if multi_label else ()
    batch = batch_spec(local_batch, image_size, mesh, labels)
    return step.lower(abstract_inputs[0], batch, *abstract_inputs[1]).compile()


def output_classes(model: Any, class_embeddings_shape: tuple[int, ...] | None = None) -> int:
    """How many logits the model gives an image: its classes, or a zero-shot model's rows of
    class embeddings."""
    return model.num_classes if class_embeddings_shape is None else int(class_embeddings_shape[0])


def batch_spec(
    local_batch: int, image_size: int, mesh: Mesh, label_shape: tuple[int, ...] = ()
) -> dict[str, jax.ShapeDtypeStruct]:
    """The global shapes of one batch, for compiling ahead of the first batch; ``label_shape``:
    each row's label, () for a class index, (classes,) for a multi-hot row."""
    sharding = NamedSharding(mesh, PartitionSpec(BATCH_AXIS))
    n = local_batch * jax.process_count()
    label_dtype = jnp.uint8 if label_shape else jnp.int32
    return {
        "image": jax.ShapeDtypeStruct((n, image_size, image_size, 3), jnp.uint8, sharding=sharding),
        "label": jax.ShapeDtypeStruct((n, *label_shape), label_dtype, sharding=sharding),
        "mask": jax.ShapeDtypeStruct((n,), jnp.bool_, sharding=sharding),
        "index": jax.ShapeDtypeStruct((n,), jnp.int32, sharding=sharding),
    }


def host_range(size: int) -> tuple[int, int]:
    """The contiguous slice of the dataset this process evaluates."""
    per_host = math.ceil(size / jax.process_count())
    start = min(size, jax.process_index() * per_host)
    return start, min(size, start + per_host)


def preprocessed_batches(
    source: Any,
    prep: Preprocessing,
    start: int,
    end: int,
    label_map: LabelMap,
    local_batch: int,
    steps: int,
    skipped: dict[int, str],
    workers: int | None = None,
) -> Iterator[Batch]:
    """Exactly ``steps`` batches of ``local_batch`` rows of images [start, end), preprocessed in
    parallel, in index order: labels as ``label_map.rows`` makes them, a ``mask`` of real rows, each row's
    dataset ``index``; an image that cannot be read goes into ``skipped`` (index -> reason),
    and empty batches at the end make every process run the same number of steps. (``pipeline``'s
    stages: ``eval_keys``, ``Read`` of ``EvalTransform`` on the host pool, ``eval_examples``,
    ``eval_batches_of``.)"""
    work = EvalTransform(prep)
    examples = eval_examples(ordered_map(Read(source, work), eval_keys(start, end), workers), skipped)
    yield from eval_batches_of(examples, local_batch, steps, host_images(work.size), label_map)


def pad_batch(images: np.ndarray, labels: np.ndarray, indices: np.ndarray, rows: int) -> Batch:
    """``rows`` rows: the given ones, then zeros masked out."""
    padding = np.zeros((rows - len(images), *images.shape[1:]), np.uint8)
    return eval_batch(np.concatenate([images, padding]), labels, indices, rows)


def evaluate(
    model: Any,
    variables: Any,
    source: Any,
    prep: Preprocessing,
    label_map: LabelMap,
    global_batch: int,
    mesh: Mesh,
    keep_logits: bool = False,
    progress: Callable[[int, dict[str, float]], None] | None = None,
    decoder: BatchDecoder | None = None,
    class_embeddings: np.ndarray | None = None,
) -> EvalResult:
    """Evaluate ``model`` on every image of ``source``; ``progress(images, metrics)`` is called
    after each step (metrics only every few steps, as reading them waits for the devices).
    ``decoder``: JPEGs decoded, resized and cropped on the GPU (else by PIL, exactly).
    ``class_embeddings``: a zero-shot model's input, (classes, word width), its classes in the
    order of ``label_map``'s."""
    results = evaluate_many(
        model, {"": variables}, source, prep, label_map, global_batch, mesh, keep_logits, progress, decoder,
        class_embeddings,
    )  # fmt: skip
    return results[""]


def evaluate_many(
    model: Any,
    weights: dict[str, Any],
    source: Any,
    prep: Preprocessing,
    label_map: LabelMap,
    global_batch: int,
    mesh: Mesh,
    keep_logits: bool = False,
    progress: Callable[[int, dict[str, float]], None] | None = None,
    decoder: BatchDecoder | None = None,
    class_embeddings: np.ndarray | None = None,
) -> dict[str, EvalResult]:
    """``evaluate`` for several sets of variables of one model (e.g. the weights and their EMA),
    reading and preprocessing the data once; ``progress`` follows the first set. Multi-label
    sources (``label_map.multi_label``) keep the logits whatever ``keep_logits`` says."""
    multi_label = label_map.multi_label
    keep_logits = keep_logits or multi_label
    embeddings_shape = None if class_embeddings is None else tuple(np.shape(class_embeddings))
    classes = output_classes(model, embeddings_shape)
    if label_map.num_classes != classes:
        raise InputError(f"the labels are for {label_map.num_classes} classes but the model scores {classes}")
    local_batch = local_batch_size(global_batch, mesh)
    start, end = host_range(len(source))
    steps = math.ceil(math.ceil(len(source) / jax.process_count()) / local_batch)
    weights = {name: replicate(variables, mesh) for name, variables in weights.items()}
    inputs = () if class_embeddings is None else (replicate(np.asarray(class_embeddings, np.float32), mesh),)
    compile_start = time.perf_counter()  # nearly 0 when the same step was compiled before
    compiled = compiled_eval_step(model, mesh, keep_logits, local_batch, prep.input_size, multi_label, embeddings_shape)
    compile_seconds = time.perf_counter() - compile_start

    label_shape = (classes,) if multi_label else ()
    trackers = {name: _Tracker(len(source), classes if keep_logits else 0, label_shape) for name in weights}
    first = next(iter(trackers.values()))
    skipped: dict[int, str] = {}
    loop_start = time.perf_counter()
    first_batch_seconds = 0.0
    if decoder is None:
        batches = preprocessed_batches(source, prep, start, end, label_map, local_batch, steps, skipped)
    else:
        batches = decoded_eval_batches(source, prep, start, end, label_map, local_batch, steps, skipped, decoder)
    for number, (host, device) in enumerate(prefetch_to_devices(batches, mesh)):
        if number == 0:
            first_batch_seconds = time.perf_counter() - loop_start
        for name, tracker in trackers.items():
            tracker.add(host, *compiled(weights[name], device, *inputs))
        if progress is not None:
            progress(first.images, first.running() if number % 10 == 9 else {})
    for tracker in trackers.values():
        tracker.flush()
    # The steps run asynchronously: the loop ends when the last one is dispatched, not done.
    jax.block_until_ready([tracker.totals for tracker in trackers.values()])
    wall_seconds = time.perf_counter() - loop_start
    return {
        name: tracker.result(compile_seconds, wall_seconds, first_batch_seconds, skipped, source.describe)
        for name, tracker in trackers.items()
    }


class _Tracker:
    """Accumulates device totals, which images were seen, and (optionally) their logits."""

    def __init__(self, size: int, num_classes: int, label_shape: tuple[int, ...] = ()):
        self.seen = np.zeros(size, bool)
        self.totals: dict[str, jax.Array] | None = None
        self.logits = np.full((size, num_classes), np.nan, np.float32) if num_classes else None
        self.labels = np.full((size, *label_shape), -1, np.int8 if label_shape else np.int64)
        self.multi_label = bool(label_shape)
        self.images = 0
        self.pending: list[tuple[Batch, jax.Array]] = []

    def add(self, host: Batch, totals: dict[str, jax.Array], outputs: dict[str, jax.Array]) -> None:
        """Count one step's batch (``host``: its rows on this process; the rest: the step's output)."""
        self.totals = totals if self.totals is None else jax.tree_util.tree_map(jnp.add, self.totals, totals)
        real = host["mask"]
        self.seen[host["index"][real]] = True
        self.labels[host["index"][real]] = host["label"][real]
        self.images += int(real.sum())
        if self.logits is not None:
            self.pending.append((host, outputs["logits"]))
            if len(self.pending) > 2:  # fetch with a lag, so the devices keep working
                self._store(*self.pending.pop(0))

    def flush(self) -> None:
        for item in self.pending:
            self._store(*item)
        self.pending = []

    def _store(self, host: Batch, logits: jax.Array) -> None:
        real = host["mask"]
        self.logits[host["index"][real]] = local_rows(logits)[real]

    def running(self) -> dict[str, float]:
        totals = jax.device_get(self.totals)
        count = max(float(totals["count"]), 1.0)
        if self.multi_label:
            return {"loss": float(totals["loss"]) / count}
        return {"top1": 100 * float(totals["top1"]) / count, "top5": 100 * float(totals["top5"]) / count}

    def result(
        self,
        compile_seconds: float,
        wall_seconds: float,
        first_batch_seconds: float,
        reasons: dict[int, str],
        describe: Callable[[int], str],
    ) -> EvalResult:
        totals = {k: float(v) for k, v in jax.device_get(self.totals).items()}
        seen = multihost_utils.process_allgather(self.seen).reshape(-1, self.seen.size)
        if int(totals["count"]) != int(seen.sum()) or int(seen.sum(0).max(initial=0)) > 1:
            raise RuntimeError(f"evaluation miscounted: {totals['count']} counted, {seen.sum()} images seen")
        logits, labels = self.logits, self.labels
        if jax.process_count() > 1:  # each image was evaluated by exactly one process
            labels = multihost_utils.process_allgather(labels).reshape(-1, *labels.shape).max(0)
            if logits is not None:
                logits = np.fmax.reduce(multihost_utils.process_allgather(logits).reshape(-1, *logits.shape), axis=0)
        skipped = [
            (describe(int(i)), reasons.get(int(i), "unreadable (reported by another process)"))
            for i in np.flatnonzero(~seen.any(0))
        ]
        count = max(totals["count"], 1.0)
        per_class_ap = None
        if self.multi_label:  # from every image's row, whichever process evaluated it
            rows = seen.any(0)
            scores, targets = logits[rows], labels[rows]
            per_class_ap = np.full(scores.shape[1], np.nan)  # weights that give NaN rank nothing
            if np.isfinite(scores).all():
                per_class_ap = 100 * average_precision_per_class(scores, targets)
        return EvalResult(
            num_images=int(totals["count"]),
            top1=None if self.multi_label else 100 * totals["top1"] / count,
            top5=None if self.multi_label else 100 * totals["top5"] / count,
            loss=totals["loss"] / count,
            compile_seconds=compile_seconds,
            wall_seconds=wall_seconds,
            first_batch_seconds=first_batch_seconds,
            skipped=skipped,
            logits=logits,
            labels=labels,
            per_class_ap=per_class_ap,
        )
