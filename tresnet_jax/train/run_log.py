"""What the step loop records: the steps' metrics read one step late, checked for divergence and
written as rows of ``workdir/metrics.jsonl`` (and TensorBoard scalars), with the progress bar, the
count of unreadable training images passed over and the host's CPU time per training image."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import jax

from tresnet_jax.data.host_pool import HostCost
from tresnet_jax.errors import InputError
from tresnet_jax.progress import ProgressBar
from tresnet_jax.train.events import ScalarWriter

METRICS_FILE = "metrics.jsonl"


class TrainingDiverged(InputError):
    """The loss or the gradients became NaN/inf (not an fp16 overflow the loss scale absorbs)."""


def check_finite(step: int, row: dict[str, float], precision: str) -> None:
    """Stop (``TrainingDiverged``) on a step whose loss, gradients or parameters are not finite,
    unless an fp16 loss scale above 1 can still absorb the overflow."""
    overflow = precision != "fp16" and row["finite"] < 1
    if not math.isfinite(row["loss"]) or overflow or row["params_finite"] < 1:
        raise TrainingDiverged(
            f"the loss became {row['loss']} at step {step} (lr {row['lr']:.3g}, {precision}); "
            f"training stopped and no checkpoint was written after it: lower --lr or try --precision fp32"
        )
    if precision == "fp16" and row["loss_scale"] <= 1.0 and row["finite"] < 1:
        raise TrainingDiverged(f"fp16 gradients overflow even with loss scale 1 at step {step}")


class LaggedMetrics:
    """The metrics of dispatched steps, read one step late: a log due at step s is read once
    step s + 1 is queued behind it, so the device never waits while the host reads and writes
    them. Checkpoints, validation and the end read everything at once (they wait anyway)."""

    def __init__(self) -> None:
        self.pending: list[tuple[int, Any]] = []
        self.due = False

    def push(self, step: int, metrics: Any, log: bool, sync: bool) -> list[list[tuple[int, Any]]]:
        """Add the metrics of ``step``, just dispatched; return the windows of (step, metrics) to
        read now, oldest first. Each window is logged as one row, its last step's."""
        ready = []
        if self.due:
            ready.append(self.pending)
            self.pending = []
        self.pending.append((step, metrics))
        self.due = log and not sync
        if sync:
            ready.append(self.pending)
            self.pending = []
        return ready


class MetricsLog:
    """metrics.jsonl, and TensorBoard scalars when the ``tensorboard`` package is installed
    (written without TensorFlow, tresnet_jax/train/events.py); rows past the resumed step are
    dropped, so a resumed run's log reads like an uninterrupted one's."""

    def __init__(self, workdir: Path, start_step: int, enabled: bool):
        self.enabled = enabled
        self.path = workdir / METRICS_FILE
        self.writer = None
        if not enabled:
            return
        if self.path.exists():
            lines = self.path.read_text().splitlines()
            kept = [line for line in lines if line and json.loads(line)["step"] <= start_step]
            self.path.write_text("".join(f"{line}\n" for line in kept))
        try:
            self.writer = ScalarWriter(workdir / "tensorboard")
        except ImportError:
            self.writer = None

    def write(self, row: dict[str, float]) -> None:
        if not self.enabled:
            return
        now = time.time()
        with self.path.open("a") as f:
            f.write(json.dumps({"time": now, **row}) + "\n")
        if self.writer is not None:
            self.writer.add(int(row["step"]), {k: v for k, v in row.items() if k not in ("step", "time")}, now)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class UnreadableImages:
    """The training images this process passed over so far, each replaced in its batch by the
    next readable one: named as they come, counted in the metrics rows."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, image: str, reason: str) -> None:
        self.count += 1
        where = f"process {jax.process_index()}: " if jax.process_count() > 1 else ""
        print(f"{where}unreadable training image {image}: {reason} (replaced by the next readable image)", flush=True)


class StepLog:
    """The training steps' rows: each window of steps that LaggedMetrics hands over is checked
    for divergence and written as one row (its last step's metrics, the throughput since the
    previous row, the unreadable images so far and, given the input pool's ``host_cost``, the
    mean CPU milliseconds the host spent on a training image since the previous row:
    ``host_ms_per_image``), and moves the progress bar."""

    def __init__(
        self,
        metrics_log: MetricsLog,
        bar: ProgressBar,
        unreadable: UnreadableImages,
        batch_size: int,
        steps_per_epoch: int,
        precision: str,
        host_cost: HostCost | None = None,
    ):
        self.metrics_log = metrics_log
        self.bar = bar
        self.unreadable = unreadable
        self.batch_size = batch_size
        self.steps_per_epoch = steps_per_epoch
        self.precision = precision
        self.host_cost = host_cost
        self.restart_clock()

    def restart_clock(self) -> None:
        """Time the throughput from now on (at the start, after a row, validation or checkpoint)."""
        self.window_start = time.perf_counter()

    def write(self, window: list[tuple[int, Any]]) -> None:
        """Fetch the metrics of the steps in ``window`` (waiting for them), stop on a non-finite
        one, write the last step's row and show it on the progress bar."""
        values = [(step, {k: float(v) for k, v in jax.device_get(m).items()}) for step, m in window]
        rate = len(window) * self.batch_size / (time.perf_counter() - self.window_start)
        for step, row in values:
            check_finite(step, row, self.precision)
        step, row = values[-1]
        host_ms = self.host_cost.take_ms_per_image() if self.host_cost is not None else None
        host = {} if host_ms is None else {"host_ms_per_image": host_ms}
        self.metrics_log.write(
            {
                "step": step,
                "epoch": step / self.steps_per_epoch,
                **row,
                "images_per_second": rate,
                "unreadable_images": self.unreadable.count,
                **host,
            }
        )
        self.restart_clock()
        self.bar.update(step * self.batch_size, {"loss": row["loss"], "lr": row["lr"], **host})
