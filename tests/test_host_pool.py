"""The host pool's worker processes: rows come back through shared memory, in order and equal to
the threads' rows, the shared memory is gone once the stream stops, and the CPU time the
function takes per item is measured on threads and processes alike."""

import dataclasses
import multiprocessing
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.blocked_imports import REPO
from tresnet_jax.data import host_pool
from tresnet_jax.data.host_pool import FIRST_SLOT_BYTES, HostCost, ordered_map
from tresnet_jax.errors import InputError, UnreadableImage
from tresnet_jax.train.run_log import StepLog, UnreadableImages

ITEMS = 40
BIG = 320  # 320 x 320 x 3 bytes > FIRST_SLOT_BYTES: pickled until the slots widen


@dataclasses.dataclass(frozen=True)
class Example:
    """A type of a caller's, which the pool does not open: pickled whole."""

    image: np.ndarray
    label: int


# The functions are objects, not functions, so that the fork server imports this module once
# (host_pool.server_preload), not each pool's workers again.


@dataclasses.dataclass(frozen=True)
class MakeRow:
    """A deterministic result of item ``i``, of one of four kinds (an array, a tuple with the
    array first or last, anything else), of varying size and dtype; some items are unreadable,
    and ``bug_at`` fails."""

    bug_at: int = -1

    def __call__(self, i: int):
        if i == self.bug_at:
            raise RuntimeError("a bug, not an unreadable image")
        return make_row(i)


def make_row(i: int):
    if i % 9 == 4:
        raise InputError(f"item {i} is unreadable")
    if i % 9 == 7:
        raise UnreadableImage(f"image{i}.jpg", "truncated")
    side = BIG if i % 10 == 2 else 8 + 5 * (i % 7)
    row = np.random.default_rng(i).integers(0, 256, (side, side + 1, 3), np.uint8)
    if i % 5 == 1:
        row = row.astype(np.float32) / 255
    kind = i % 4
    if kind == 0:
        return row
    if kind == 1:
        return row, f"label {i}"
    if kind == 2:
        return f"label {i}", (i, "a nested tuple is not opened"), row
    return Example(row, i) if i % 8 == 3 else {"image": row, "label": i}  # no rows the pool sees


class Spin5ms:
    def __call__(self, i: int) -> np.ndarray:
        end = time.thread_time() + 0.005
        while time.thread_time() < end:
            pass
        return np.zeros((4, 4, 3), np.uint8)


def outcomes(fn, processes, items=range(ITEMS), cost=None):
    return list(ordered_map(fn, items, 2, 4, processes, cost))


def plain(value):
    """A result as comparable data: arrays as (dtype, shape, bytes)."""
    if isinstance(value, np.ndarray):
        return ("array", value.dtype.str, value.shape, value.tobytes())
    if isinstance(value, tuple):
        return ("tuple", *map(plain, value))
    if isinstance(value, Example):
        return ("example", plain(value.image), value.label)
    if isinstance(value, dict):
        return ("dict", *((k, plain(v)) for k, v in value.items()))
    return value


def shm_names() -> set[str]:
    return set(os.listdir(host_pool.SHM_ROOT))


@pytest.fixture
def made_buffers(monkeypatch):
    """The names of the shared-memory buffers the pool makes (other test files may make theirs
    at the same time)."""
    names = []
    real = host_pool.shared_memory.SharedMemory

    def recording(*args, **kwargs):
        buffer = real(*args, **kwargs)
        if kwargs.get("create"):
            names.append(buffer.name)
        return buffer

    monkeypatch.setattr(host_pool.shared_memory, "SharedMemory", recording)
    return names


def test_processes_give_the_threads_rows_in_order_through_shared_memory(monkeypatch, made_buffers):
    from_slots = []
    real = host_pool._out_of_slot

    def counting(outcome, buffer, slot_bytes):
        from_slots.append(outcome.item)
        return real(outcome, buffer, slot_bytes)

    monkeypatch.setattr(host_pool, "_out_of_slot", counting)
    threads, processes = outcomes(MakeRow(), False), outcomes(MakeRow(), True)
    assert [o.item for o in processes] == list(range(ITEMS))
    assert [(o.item, o.error, plain(o.value)) for o in processes] == [
        (o.item, o.error, plain(o.value)) for o in threads
    ]
    assert processes[4].error == "item 4 is unreadable"
    assert processes[7].error == "truncated"
    assert sum(o.error is not None for o in processes) == 8
    assert isinstance(processes[3].value, Example)
    assert isinstance(processes[1].value, tuple)
    assert processes[2].value[:2] == ("label 2", (2, "a nested tuple is not opened"))
    # Every row that fits, a result that is an array or an array in a tuple, came back through a
    # slot; the first four chunks (32 items) had 256 KiB slots, so the big rows among them came
    # pickled, and the last chunk had slots widened for them.
    through = set(from_slots)
    kinds = {i for i in range(ITEMS) if i % 4 != 3 and i % 9 not in (4, 7)}
    big = {i for i in kinds if i % 10 == 2}
    assert big == {2, 12, 32}
    assert through == kinds - {2, 12}
    assert made_buffers
    assert not shm_names() & set(made_buffers)
    assert FIRST_SLOT_BYTES < BIG * (BIG + 1) * 3


def test_stopping_early_or_on_a_bug_leaves_no_shared_memory_and_no_workers(made_buffers):
    before = shm_names()
    stream = ordered_map(MakeRow(), range(1000), 2, 4, True)
    assert [next(stream).item for _ in range(10)] == list(range(10))
    assert shm_names() & set(made_buffers)  # the buffers in use (narrower ones are gone already)
    stream.close()
    assert not set(made_buffers) & shm_names()
    assert not (shm_names() - before) & set(made_buffers)
    assert multiprocessing.active_children() == []

    made_buffers.clear()
    with pytest.raises(RuntimeError, match="a bug"):
        outcomes(MakeRow(bug_at=13), True)
    assert made_buffers
    assert not set(made_buffers) & shm_names()
    assert multiprocessing.active_children() == []


STOP_EARLY = """
from tests.test_host_pool import MakeRow
from tresnet_jax.data.host_pool import ordered_map
stream = ordered_map(MakeRow(), range(1000), 2, 4, True)
print(sum(next(stream).error is None for _ in range(20)))
stream.close()
"""


@pytest.mark.slow
def test_a_script_that_stops_early_exits_without_resource_tracker_warnings():
    """The resource tracker names any shared memory not unlinked when the script exits, and
    warns of its own registry going wrong: it must say nothing."""
    before = shm_names()
    done = subprocess.run([sys.executable, "-c", STOP_EARLY], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "16"
    assert done.stderr == ""
    leaked = {name for name in shm_names() - before if name.startswith("psm_")}
    assert not leaked  # another test file's pool may hold buffers now, but not past its end: rare


@pytest.mark.parametrize("processes", [False, True])
def test_host_cost_is_the_cpu_time_an_item_takes(processes):
    # spin_5ms returns once its own thread has used 5 ms of CPU, so a figure below 5 ms would
    # be a measurement bug (thread CPU time <= process CPU time); above it is only the Python
    # around the call. 50 ms (10x) leaves room for a slow or loaded machine, since CPU time,
    # unlike wall time, does not grow while a thread waits for a core or the GIL.
    cost = HostCost()
    assert cost.take_ms_per_image() is None
    assert len(outcomes(Spin5ms(), processes, range(24), cost)) == 24
    ms = cost.take_ms_per_image()
    assert 4.9 <= ms <= 50
    assert cost.take_ms_per_image() is None  # read and reset


class Rows:
    def __init__(self):
        self.rows = []

    def write(self, row):
        self.rows.append(row)


class Bar:
    def __init__(self):
        self.shown = []

    def update(self, done, metrics):
        self.shown.append(metrics)


def test_the_metrics_rows_carry_the_host_s_cpu_milliseconds_per_image():
    rows, bar, cost = Rows(), Bar(), HostCost()
    log = StepLog(rows, bar, UnreadableImages(), 4, 10, "fp32", host_cost=cost)
    metrics = {"loss": 1.0, "lr": 0.1, "finite": 1.0, "params_finite": 1.0, "loss_scale": 1.0}
    cost.add(0.012, 4)
    log.write([(1, metrics)])
    log.write([(2, metrics)])  # no image since
    assert rows.rows[0]["host_ms_per_image"] == pytest.approx(3.0)
    assert "host_ms_per_image" not in rows.rows[1]
    assert bar.shown[0]["host_ms_per_image"] == pytest.approx(3.0)
    assert "host_ms_per_image" not in bar.shown[1]
