"""Interleaved timing of several runners on one device.

Every runner gets the same treatment: warm-up steps that are not counted, then timed windows
of a few steps each, ending with the device synchronised. The runners take turns window by
window (in alternating order), so a slow phase of a shared machine hits all of them alike;
the figure kept is the median window.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path


@dataclasses.dataclass
class Runner:
    """One framework/variant, ready to run: ``run(n)`` does n steps and returns once the
    device has finished them."""

    name: str
    framework: str
    run: Callable[[int], None]
    first_call_s: float  # building the step and its first call: compile time included
    compile_s: float | None = None  # compilation alone, where it can be separated
    peak_memory: Callable[[], int | None] = lambda: None
    notes: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Timing:
    """Seconds per step: the median window and every window."""

    step_s: float
    windows_s: tuple[float, ...]

    @property
    def spread(self) -> float:
        """(slowest - fastest) / median window: how noisy the measurement was."""
        return (max(self.windows_s) - min(self.windows_s)) / self.step_s


def time_runners(
    runners: Sequence[Runner], warmup: int, windows: int, steps: int
) -> tuple[dict[str, Timing], float | None]:
    """Median seconds per step of each runner, windows interleaved between runners, and the
    load other processes put on the machine meanwhile (``OtherLoad``)."""
    for runner in runners:
        runner.run(warmup)
    per_window: dict[str, list[float]] = {runner.name: [] for runner in runners}
    with OtherLoad() as other:
        for window in range(windows):
            order = runners if window % 2 == 0 else list(reversed(runners))
            for runner in order:
                per_window[runner.name].append(_time_window(runner.run, steps))
    return {name: Timing(statistics.median(ts), tuple(ts)) for name, ts in per_window.items()}, other.cores


def _time_window(run: Callable[[int], None], steps: int) -> float:
    start = time.perf_counter()
    run(steps)
    return (time.perf_counter() - start) / steps


def timed(fn: Callable[[], object]) -> tuple[object, float]:
    """(fn(), seconds it took)."""
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


class OtherLoad:
    """How busy other processes kept the machine while a block ran, in cores (Linux: from
    /proc; None elsewhere). A figure well above 0 means the timings shared the cores."""

    def __init__(self) -> None:
        self.cores: float | None = None

    def __enter__(self) -> OtherLoad:
        self._start = (_busy_ticks(), _own_ticks(), time.perf_counter())
        return self

    def __exit__(self, *exc: object) -> None:
        busy, own, start = self._start
        if busy is None or own is None:
            return
        elapsed = time.perf_counter() - start
        other_ticks = (_busy_ticks() - busy) - (_own_ticks() - own)
        self.cores = max(0.0, other_ticks / os.sysconf("SC_CLK_TCK") / elapsed)


def _busy_ticks() -> int | None:
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    return sum(fields) - fields[3] - fields[4]  # all but idle and iowait


def _own_ticks() -> int | None:
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[11]) + int(fields[12])  # utime + stime of every thread of this process
