"""Images decoded and transformed on the host's cores, in order: by a pool of threads on small
hosts, of processes on large ones.

PIL releases the GIL while it decodes, resizes and transforms, so on a few cores threads use
every core with no start-up and no copies. The Python around PIL's calls still holds the GIL
(a few hundred microseconds an image), and measured on a 16-core host threads stopped scaling
at about 8 (BENCHMARKS.md, "Input pipeline"); above ``THREADS_UP_TO`` cores the work goes to
one process per core, each given the function once and sent items in chunks. Each item is tried
on its own: one that cannot be read is reported with its reason and the stream goes on.

A worker process writes the rows of its results into shared memory, not into the pipe: every
chunk in flight has a buffer of ``CHUNK`` slots (``_SlotRing``), the worker copies the rows into
the slots and sends back only the rest (labels, errors, where each row lies), and this process
copies the rows out and hands the buffer to the next chunk. Pickling them instead held a 16-core
host to 62 % of the rate the images' cost predicts. The pool opens no type of its callers: a
result's rows are the numpy arrays it is made of, the result itself or the elements of a plain
``tuple``; anything else, a row that does not fit its slot, a row past the chunk's slots, and
every row when shared memory is short (budget: half of ``/dev/shm``'s free space; none without
``/dev/shm``) travel pickled, as before. Slots start at ``FIRST_SLOT_BYTES`` and grow to the
largest row seen.

``HostCost`` adds up the CPU time the function took, per item, on threads or processes alike:
what an image costs the host, whatever the number of cores (the training log's
``host_ms_per_image``).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import math
import mmap
import multiprocessing
import os
import sys
import threading
import time
import types
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from multiprocessing import shared_memory
from typing import Any, Generic, TypeVar

import numpy as np

from tresnet_jax.data.preprocess import PIL_ERRORS
from tresnet_jax.errors import InputError, reason_of

Item = TypeVar("Item")
Result = TypeVar("Result")
# What a transform raises for an image that cannot be used: reported, never fatal.
UNREADABLE = (InputError, *PIL_ERRORS)
THREADS_UP_TO = 8  # cores; more go to processes
CHUNK = 8  # items sent to a worker process at a time
FIRST_SLOT_BYTES = 256 * 1024  # a 224-pixel RGB uint8 row (147 KiB) fits; larger ones widen the slots
SHM_ROOT = "/dev/shm"


def host_threads() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@dataclasses.dataclass(frozen=True)
class Outcome(Generic[Item, Result]):
    """One item's result, or why it has none."""

    item: Item
    value: Result | None
    error: str | None = None  # the reason, without the item's name where the error keeps them apart


class HostCost:
    """The CPU time the per-item function took (thread CPU time on threads, process CPU time in
    worker processes), added up from every worker since it was last read; safe to share between
    threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seconds = 0.0
        self._items = 0

    def add(self, cpu_seconds: float, items: int = 1) -> None:
        with self._lock:
            self._seconds += cpu_seconds
            self._items += items

    def take_ms_per_image(self) -> float | None:
        """The mean CPU milliseconds of the items done since the last call (an unreadable one
        counts too; None when there were none), and a new window from now."""
        with self._lock:
            seconds, items = self._seconds, self._items
            self._seconds, self._items = 0.0, 0
        return 1000 * seconds / items if items else None


def attempt(fn: Callable[[Item], Result], item: Item) -> Outcome[Item, Result]:
    """``fn(item)`` as an outcome: its value, or the reason one of UNREADABLE gives."""
    try:
        return Outcome(item, fn(item))
    except UNREADABLE as err:
        return Outcome(item, None, reason_of(err))


def ordered_map(
    fn: Callable[[Item], Result],
    items: Iterable[Item],
    workers: int | None = None,
    ahead: int | None = None,
    processes: bool | None = None,
    cost: HostCost | None = None,
) -> Iterator[Outcome[Item, Result]]:
    """``fn`` over ``items`` on ``workers`` threads or processes (default: one per core;
    processes when there are more than THREADS_UP_TO), yielded in the items' order with about
    ``ahead`` items in flight; an item whose ``fn`` raises one of UNREADABLE comes out with the
    error's message instead of a value (anything else is a bug and propagates). With processes,
    ``fn`` and the items are pickled: ``fn`` once per worker, so a callable object holding its
    dataset is sent once; the results' rows come back through shared memory (module docstring).
    ``cost`` is given the CPU time each item took."""
    workers = workers or host_threads()
    ahead = ahead or 4 * workers
    if workers > THREADS_UP_TO if processes is None else processes:
        return _process_map(fn, items, workers, ahead, cost)
    return _thread_map(fn, items, workers, ahead, cost)


def _timed_attempt(fn: Callable[[Item], Result], item: Item, cost: HostCost | None) -> Outcome[Item, Result]:
    start = time.thread_time()
    outcome = attempt(fn, item)
    if cost is not None:
        cost.add(time.thread_time() - start)
    return outcome


def _thread_map(
    fn: Callable[[Item], Result], items: Iterable[Item], threads: int, ahead: int, cost: HostCost | None
) -> Iterator[Outcome]:
    iterator = iter(items)
    with concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="tresnet-input") as pool:
        pending: deque[concurrent.futures.Future] = deque(
            pool.submit(_timed_attempt, fn, item, cost) for item in itertools.islice(iterator, ahead)
        )
        while pending:
            outcome = pending.popleft().result()
            for item in itertools.islice(iterator, 1):
                pending.append(pool.submit(_timed_attempt, fn, item, cost))
            yield outcome


# Rows in shared memory --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _InSlot:
    """Where a worker left a row: slot ``slot`` of its chunk's buffer; stands in for the row."""

    slot: int
    shape: tuple[int, ...]
    dtype: np.dtype


def _parts(value: Any) -> tuple:
    """What a result is made of, where its rows are looked for: a plain tuple's elements, or the
    result itself."""
    return value if type(value) is tuple else (value,)


def _each_part(value: Any, convert: Callable[[Any], Any]) -> Any:
    """``value`` with ``convert`` applied to each of its parts (``_parts``)."""
    converted = tuple(convert(part) for part in _parts(value))
    return converted if type(value) is tuple else converted[0]


def _fits(row: Any, slot_bytes: int) -> bool:
    return isinstance(row, np.ndarray) and not row.dtype.hasobject and 0 < row.nbytes <= slot_bytes


def _into_slots(outcomes: list[Outcome], name: str, slot_bytes: int) -> list[Outcome]:
    """(In a worker.) The rows of ``outcomes`` written into the slots of buffer ``name`` in order,
    each replaced by its ``_InSlot``; a row that does not fit, or finds no slot left, stays."""
    buffer = shared_memory.SharedMemory(name)
    slots = iter(range(CHUNK))

    def placed(part: Any) -> Any:
        slot = next(slots, None) if _fits(part, slot_bytes) else None
        if slot is None:
            return part
        np.ndarray(part.shape, part.dtype, buffer=buffer.buf, offset=slot * slot_bytes)[...] = part
        return _InSlot(slot, part.shape, part.dtype)

    try:
        return [
            outcome if outcome.error is not None else Outcome(outcome.item, _each_part(outcome.value, placed))
            for outcome in outcomes
        ]
    finally:
        buffer.close()  # this process's mapping only: the buffer is the parent's to unlink


def _in_slots(outcome: Outcome) -> bool:
    return outcome.error is None and any(isinstance(part, _InSlot) for part in _parts(outcome.value))


def _out_of_slot(outcome: Outcome, buffer: shared_memory.SharedMemory, slot_bytes: int) -> Outcome:
    """(In the parent.) ``outcome`` with the rows its worker left in slots copied out."""

    def copied(part: Any) -> Any:
        if not isinstance(part, _InSlot):
            return part
        return np.ndarray(part.shape, part.dtype, buffer=buffer.buf, offset=part.slot * slot_bytes).copy()

    return Outcome(outcome.item, _each_part(outcome.value, copied), outcome.error)


def _shm_budget() -> int:
    """The bytes of shared memory the buffers may take: half of what /dev/shm has free (a
    container's default is 64 MB); none where there is no /dev/shm."""
    try:
        stats = os.statvfs(SHM_ROOT)
    except OSError:
        return 0
    return stats.f_bavail * stats.f_frsize // 2


@dataclasses.dataclass
class _SlotRing:
    """The parent's shared-memory buffers, one for each chunk in flight, reused once its rows are
    copied out: ``CHUNK`` slots of ``slot_bytes``, widened (new buffers) to the largest row seen.
    ``acquire`` gives None (rows go pickled) past the budget or when one cannot be made."""

    budget: int = dataclasses.field(default_factory=_shm_budget)
    slot_bytes: int = FIRST_SLOT_BYTES
    free: list[tuple[shared_memory.SharedMemory, int]] = dataclasses.field(default_factory=list)
    made: dict[str, shared_memory.SharedMemory] = dataclasses.field(default_factory=dict)
    allocated: int = 0

    def acquire(self) -> tuple[shared_memory.SharedMemory, int] | None:
        while self.free:
            buffer, slot_bytes = self.free.pop()
            if slot_bytes >= self.slot_bytes:
                return buffer, slot_bytes
            self._drop(buffer)  # too narrow for the rows seen since
        size = CHUNK * self.slot_bytes
        if self.allocated + size > self.budget:
            return None
        try:
            buffer = shared_memory.SharedMemory(create=True, size=size)
        except OSError:
            return None
        self.made[buffer.name] = buffer
        self.allocated += size
        return buffer, self.slot_bytes

    def take(self, outcomes: list[Outcome], held: tuple[shared_memory.SharedMemory, int] | None) -> list[Outcome]:
        """The outcomes of a chunk, rows copied out of ``held`` (then free for another chunk),
        the slots widened for the next buffers if a row was too large for its slot."""
        try:
            if held is not None:
                outcomes = [_out_of_slot(outcome, *held) if _in_slots(outcome) else outcome for outcome in outcomes]
        finally:
            if held is not None:
                self.free.append(held)
        for outcome in outcomes:
            for row in _parts(outcome.value) if outcome.error is None else ():
                if isinstance(row, np.ndarray) and not row.dtype.hasobject:
                    self.slot_bytes = max(self.slot_bytes, mmap.PAGESIZE * math.ceil(row.nbytes / mmap.PAGESIZE))
        return outcomes

    def _drop(self, buffer: shared_memory.SharedMemory) -> None:
        del self.made[buffer.name]
        self.allocated -= buffer.size
        buffer.close()
        buffer.unlink()

    def close(self) -> None:
        """Unlink every buffer (once no worker writes into them any more)."""
        self.free.clear()
        for buffer in list(self.made.values()):
            self._drop(buffer)


# Worker processes -------------------------------------------------------------------------------

_worker_fn: Callable[[Any], Any] | None = None


def _install(fn: Callable[[Any], Any]) -> None:
    global _worker_fn
    _worker_fn = fn


def _run_chunk(items: list[Any], buffer: str | None, slot_bytes: int) -> tuple[list[Outcome], float]:
    """The chunk's outcomes (rows in ``buffer``'s slots when there is one) and the CPU seconds
    the function took over them."""
    outcomes, cpu = [], 0.0
    for item in items:
        start = time.process_time()
        outcomes.append(attempt(_worker_fn, item))
        cpu += time.process_time() - start
    if buffer is not None:
        outcomes = _into_slots(outcomes, buffer, slot_bytes)
    return outcomes, cpu


def server_preload(fn: Callable[[Any], Any]) -> list[str]:
    """The modules the fork server imports once, before it forks any worker: ``fn``'s and those
    the main script imported. Every worker runs the main script again (what Python's
    multiprocessing does; its own preload of ``__main__`` never reaches the server), so without
    them each of N workers imports JAX and the rest anew, N at once: 9.7 s before the first batch
    on a 16-core host (BENCHMARKS.md). A notebook's ``__main__`` (no file) is not run again."""
    main = sys.modules.get("__main__")
    names = {type(fn).__module__}
    for value in vars(main).values() if getattr(main, "__file__", None) else ():
        name = value.__name__ if isinstance(value, types.ModuleType) else getattr(value, "__module__", None)
        if isinstance(name, str) and name in sys.modules and not name.startswith("__"):
            names.add(name)
    return sorted(names)


def _process_map(
    fn: Callable[[Item], Result], items: Iterable[Item], processes: int, ahead: int, cost: HostCost | None
) -> Iterator[Outcome]:
    # forkserver: workers fork from a fresh server process, not from this one (whose threads,
    # JAX's among them, make fork unsafe); the server imports what they need once.
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
    if context.get_start_method() == "forkserver":
        context.set_forkserver_preload(server_preload(fn))  # ignored once the server runs
    iterator = iter(items)
    chunks = iter(lambda: list(itertools.islice(iterator, CHUNK)), [])
    ring = _SlotRing()
    pending: deque[tuple[concurrent.futures.Future, tuple[shared_memory.SharedMemory, int] | None]] = deque()
    pool = concurrent.futures.ProcessPoolExecutor(processes, mp_context=context, initializer=_install, initargs=(fn,))

    def submit(chunk: list[Item]) -> None:
        held = ring.acquire()
        where = (held[0].name, held[1]) if held is not None else (None, 0)
        pending.append((pool.submit(_run_chunk, chunk, *where), held))

    try:
        # Two chunks a worker at least: one it works on, one waiting, so none idles.
        in_flight = max(2 * processes, ahead // CHUNK)
        for chunk in itertools.islice(chunks, in_flight):
            submit(chunk)
        while pending:
            future, held = pending.popleft()
            outcomes, cpu = future.result()
            outcomes = ring.take(outcomes, held)
            if cost is not None:
                cost.add(cpu, len(outcomes))
            for chunk in itertools.islice(chunks, 1):
                submit(chunk)
            yield from outcomes
    finally:
        try:
            pool.shutdown(wait=True, cancel_futures=True)  # the chunks already started end first
        finally:
            ring.close()


def stack_rows(rows: list[np.ndarray], size: int, total: int | None = None) -> np.ndarray:
    """uint8 (total, size, size, 3) from per-image arrays, zeros below them (``total``: default
    ``len(rows)``; an empty batch keeps its shape)."""
    out = np.zeros((len(rows) if total is None else total, size, size, 3), np.uint8)
    for i, row in enumerate(rows):
        out[i] = row
    return out
