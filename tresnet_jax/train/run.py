"""A whole training run: data, model (fresh or fine-tuned from converted weights), the
data-parallel step, periodic evaluation, Orbax checkpoints with automatic resume, metrics
(JSON lines and TensorBoard) and the final weights.

A run lives in its ``workdir``; started again with the same settings it continues from its last
complete checkpoint and ends with exactly the parameters an uninterrupted run would have.
SIGTERM or SIGINT stops it after the current step with a checkpoint of that step.

``Run`` puts together the parts of a run (``parts``), its checkpoints (``checkpoints``), the
step loop written here with what it records (``run_log``), ``validation`` and the ``final_weights``.
"""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from tresnet_jax.data.gpu_batches import decoded_train_batches
from tresnet_jax.data.gpu_decode import decoder_report
from tresnet_jax.data.host_pool import HostCost
from tresnet_jax.data.train_stream import train_batches
from tresnet_jax.errors import InputError
from tresnet_jax.progress import ProgressBar
from tresnet_jax.runtime.parallel import BATCH_AXIS, host_copy, prefetch_to_devices
from tresnet_jax.train.checkpoints import Checkpoints
from tresnet_jax.train.config import TrainConfig, check_resumable, write_config
from tresnet_jax.train.final_weights import write_final_weights
from tresnet_jax.train.parts import RunParts, build
from tresnet_jax.train.preemption import StopRequests
from tresnet_jax.train.run_log import LaggedMetrics, MetricsLog, StepLog, UnreadableImages
from tresnet_jax.train.step import TrainState, make_train_step
from tresnet_jax.train.validation import validate


class Stopped(Exception):
    """The run stopped on a signal after writing a checkpoint of its current step."""

    def __init__(self, signum: int, step: int, total_steps: int, checkpoint: Path):
        self.signum = signum
        super().__init__(
            f"stopped by {signal.Signals(signum).name} at step {step} of {total_steps}: checkpoint {checkpoint}; "
            f"the same command continues from there"
        )


class Run:
    """One training run in its workdir."""

    def __init__(self, cfg: TrainConfig):
        self.parts = build(cfg)  # every flag is checked before anything is read or written
        self.unreadable = UnreadableImages()

    def run(self, stops: StopRequests | None = None) -> dict[str, Any]:
        """Train to the end, or until SIGTERM/SIGINT (``Stopped``, after a checkpoint); a
        command line passes the StopRequests it installed when it started."""
        with contextlib.nullcontext(stops) if stops is not None else StopRequests() as active:
            active.listen()
            return self._run(active)

    def _run(self, stops: StopRequests) -> dict[str, Any]:
        parts, cfg = self.parts, self.parts.cfg
        check_resumable(parts.workdir, cfg)
        parts.workdir.mkdir(parents=True, exist_ok=True)
        if parts.lead:
            write_config(parts.workdir, cfg)
        checkpoints = Checkpoints(parts)
        state, how = checkpoints.initial_state()
        start = int(host_copy(state.step))
        parts.log(
            f"{how}; {parts.train_source.name}: {len(parts.train_source)} images, {parts.num_classes} classes, "
            f"{parts.steps_per_epoch} steps/epoch, {parts.total_steps} steps, batch {cfg.optim.batch_size} on "
            f"{parts.mesh.devices.size} device(s), {cfg.model.precision}, peak lr {cfg.peak_lr():g}"
        )
        metrics_log = MetricsLog(parts.workdir, start, parts.lead)
        if start >= parts.total_steps:
            parts.log(f"already trained: step {start} of {parts.total_steps}")
            last_eval = {}
        else:
            state, last_eval = train_steps(parts, state, start, checkpoints, metrics_log, self.unreadable, stops)
        return finish(parts, state, checkpoints, metrics_log, last_eval)


def train_steps(
    parts: RunParts,
    state: TrainState,
    start: int,
    checkpoints: Checkpoints,
    metrics_log: MetricsLog,
    unreadable: UnreadableImages,
    stops: StopRequests,
) -> tuple[TrainState, dict[str, float]]:
    """The steps from ``start`` to the last, with their logs, validations and checkpoints; the
    trained state and the last validation's row. On a stop request, ``Stopped`` after a
    checkpoint of the current step (with several processes, agreed on a log step)."""
    cfg = parts.cfg
    compiled = compile_step(parts, state)
    checkpoint_every = cfg.run.checkpoint_every or parts.steps_per_epoch
    batch_size = cfg.optim.batch_size
    host_cost = HostCost()
    batches = training_batches(parts, start, unreadable, host_cost)
    bar = ProgressBar(
        parts.total_steps * batch_size, "train", parts.lead and cfg.run.progress, initial=start * batch_size
    )
    lagged = LaggedMetrics()
    step_log = StepLog(
        metrics_log, bar, unreadable, batch_size, parts.steps_per_epoch, cfg.model.precision, host_cost=host_cost
    )
    last_eval: dict[str, float] = {}
    step = start
    for _, device_batch in prefetch_to_devices(batches, parts.mesh):
        state, metrics = compiled(state, device_batch)
        step += 1
        epoch_end = step % parts.steps_per_epoch == 0
        done = step >= parts.total_steps
        log_step = step % cfg.run.log_every == 0
        stop = None if done else stops.agreed(collective=log_step)
        sync = epoch_end or done or step % checkpoint_every == 0 or stop is not None
        for window in lagged.push(step, metrics, log=log_step, sync=sync):
            step_log.write(window)
        if stop is not None:
            checkpoints.save(state)
            checkpoints.wait_until_finished()
            bar.close()
            metrics_log.close()
            raise Stopped(stop, step, parts.total_steps, checkpoints.directory / str(step))
        eval_every = cfg.run.eval_every
        if epoch_end and eval_every and (step // parts.steps_per_epoch) % eval_every == 0 and not done:
            last_eval = validate(parts, state, step, metrics_log)
            step_log.restart_clock()
        if step % checkpoint_every == 0 or done:
            checkpoints.save(state)
            step_log.restart_clock()
        if done:
            break
    bar.close()
    if parts.decoder is not None:
        parts.log(decoder_report(parts.decoder))
    return state, last_eval


def training_batches(
    parts: RunParts, start: int, unreadable: UnreadableImages, host_cost: HostCost
) -> Iterator[dict[str, Any]]:
    """The run's batches from step ``start``: decoded on the GPU, or on the host's cores."""
    if parts.decoder is not None:
        return decoded_train_batches(
            parts.train_source, parts.stream, parts.augment, start, parts.label_map, parts.decoder, unreadable
        )
    return train_batches(
        parts.train_source,
        parts.stream,
        parts.augment,
        start,
        parts.label_map,
        unreadable,
        on_device=parts.device_augment is not None,
        cost=host_cost,
        ids=parts.example_ids,
    )


def finish(
    parts: RunParts,
    state: TrainState,
    checkpoints: Checkpoints,
    metrics_log: MetricsLog,
    last_eval: dict[str, float],
) -> dict[str, Any]:
    """Final validation, the final weights (and their EMA) as weights directories;
    the run's result: its step and last validation's row."""
    step = int(host_copy(state.step))
    final = validate(parts, state, step, metrics_log) if parts.val_source is not None else last_eval
    checkpoints.wait_until_finished()
    if parts.lead:
        write_final_weights(parts, state, step, final)
    metrics_log.close()
    return {"step": step, **final}


def compile_step(parts: RunParts, state: TrainState) -> Any:
    """The training step compiled for ``state`` and the run's batches, refused if it does not
    fit in device memory."""
    step_fn = make_train_step(parts.model, parts.tx, parts.cfg, parts.total_steps, parts.mesh, parts.device_augment)
    t0 = time.perf_counter()
    compiled = step_fn.lower(state, batch_shapes(parts)).compile()
    check_memory(compiled, parts.mesh, parts.cfg.optim.batch_size)
    parts.log(f"compiled the training step in {time.perf_counter() - t0:.1f} s")
    return compiled


def batch_shapes(parts: RunParts) -> dict[str, jax.ShapeDtypeStruct]:
    """The global training batch, abstractly: uint8 images and labels (int32 classes, or uint8
    multi-hot rows) split over the mesh; with the augmentation on the device or a model that
    drops out, the images' ids."""
    sharding = jax.sharding.NamedSharding(parts.mesh, jax.sharding.PartitionSpec(BATCH_AXIS))
    n, size = parts.cfg.optim.batch_size, parts.cfg.data.image_size
    label = jax.ShapeDtypeStruct((n, parts.num_classes), jnp.uint8, sharding=sharding)
    shapes = {
        "image": jax.ShapeDtypeStruct((n, size, size, 3), jnp.uint8, sharding=sharding),
        "label": label if parts.multi_label else jax.ShapeDtypeStruct((n,), jnp.int32, sharding=sharding),
    }
    if parts.example_ids:
        shapes["augment_ids"] = jax.ShapeDtypeStruct((n, 2), jnp.int32, sharding=sharding)
    return shapes


def suggest_batch_size(temp_bytes: int, fixed_bytes: int, limit_bytes: int, per_device_batch: int, devices: int) -> int:
    """The largest global batch whose step fits in device memory, assuming the temporaries grow
    in proportion to the batch (XLA's memory analysis of the compiled step)."""
    per_example = temp_bytes / max(per_device_batch, 1)
    fitting = int((0.95 * limit_bytes - fixed_bytes) // max(per_example, 1))
    return max(fitting, 0) * devices


def check_memory(compiled: Any, mesh: Mesh, global_batch: int) -> None:
    """Refuse, before the first step, a batch whose step needs more memory than a device has."""
    device = next(d for d in mesh.devices.flat if d.process_index == jax.process_index())
    stats = device.memory_stats() or {}
    analysis = compiled.memory_analysis()
    if "bytes_limit" not in stats or analysis is None:
        return
    fixed = analysis.argument_size_in_bytes + analysis.output_size_in_bytes - analysis.alias_size_in_bytes
    need = fixed + analysis.temp_size_in_bytes
    if need > stats["bytes_limit"]:
        devices = mesh.devices.size
        best = suggest_batch_size(
            analysis.temp_size_in_bytes, fixed, stats["bytes_limit"], global_batch // devices, devices
        )
        raise InputError(
            f"batch size {global_batch} needs {need / 2**30:.1f} GiB per device, more than the "
            f"{stats['bytes_limit'] / 2**30:.1f} GiB available; the largest that fits is about {best}"
        )
