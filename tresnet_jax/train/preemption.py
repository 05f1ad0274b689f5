"""Stopping a run cleanly on SIGTERM (spot machines, schedulers) or SIGINT (Ctrl-C).

The signal only sets a flag; the training loop looks at it after each step, writes a
checkpoint of that step and stops, so the same command continues exactly from there. A second
signal of the same kind acts as if no handler were installed (Ctrl-C twice kills at once).
With several processes, the flags are compared at steps every process visits (the logging
steps), so all of them stop after the same step.

A command line runs inside ``signals_for_the_main_thread()``, which installs the handlers at
once (a signal during start-up, even one the kernel hands to a thread that libraries started at
import time, becomes a request, never the default exit) and blocks the signals in the main
thread: the threads started inside (XLA's, Orbax's, the input pool's) inherit the block, so a
signal never interrupts a system call of theirs in the middle of a checkpoint write or a
computation. The training loop then lets the main thread take them (``listen``).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType

import jax
import numpy as np

SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextlib.contextmanager
def signals_for_the_main_thread() -> Iterator[StopRequests]:
    """StopRequests installed, and SIGTERM/SIGINT blocked in this (the main) thread and so in
    every thread it starts inside the block, until ``StopRequests.listen``. The handlers and
    the mask are restored on the way out."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        with StopRequests() as stops:
            yield stops
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class StopRequests:
    """A context manager that turns SIGTERM/SIGINT into a request to stop at a step boundary."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():  # handlers belong to the main thread
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def listen(self) -> None:
        """Let the main thread take the signals itself (one that came while they were blocked
        is handled now)."""
        if self._previous:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))

    def agreed(self, collective: bool) -> int | None:
        """The signal to stop for, or None. ``collective``: every process calls this at the same
        step and all get the same answer (one small all-gather); else only this process's flag."""
        if jax.process_count() == 1 or not collective:
            return self.received if jax.process_count() == 1 else None
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.asarray(self.received or 0, np.int32))
        received = [int(f) for f in np.ravel(flags) if f]
        return received[0] if received else None


def exit_code(signum: int) -> int:
    """The shell's convention for a process ended by a signal: 128 + its number."""
    return 128 + signum
