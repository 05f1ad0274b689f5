"""TensorBoard scalars written without TensorFlow: ``tf.Event`` protos (from the ``tensorboard``
package's generated code, which imports nothing else) in tfrecord framing. TensorBoard's own
writer imports TensorFlow when it is installed (seconds, and its C++ log lines on start)."""

from __future__ import annotations

import socket
import time
from pathlib import Path

from tresnet_jax.data.tfrecord import framed


class ScalarWriter:
    """An append-only ``events.out.tfevents.*`` file in ``directory``; None-safe to close twice."""

    def __init__(self, directory: Path):
        from tensorboard.compat.proto import event_pb2, summary_pb2

        self._event, self._summary = event_pb2.Event, summary_pb2.Summary
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}"
        self._file = self.path.open("ab")
        self._write(self._event(wall_time=time.time(), file_version="brain.Event:2"))

    def add(self, step: int, values: dict[str, float], wall_time: float) -> None:
        summary = self._summary(value=[self._summary.Value(tag=k, simple_value=float(v)) for k, v in values.items()])
        self._write(self._event(wall_time=wall_time, step=step, summary=summary))

    def _write(self, event) -> None:
        self._file.write(framed(event.SerializeToString()))
        self._file.flush()

    def close(self) -> None:
        self._file.close()
