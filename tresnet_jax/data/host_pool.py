"""Images decoded and transformed on the host's cores, in order: by a pool of threads on small
hosts, of processes on large ones.

PIL releases the GIL while it decodes, resizes and transforms, so on a few cores threads use
every core with no start-up and no copies. The Python around PIL's calls still holds the GIL
(a few hundred microseconds an image), and measured on a 16-core host threads stopped scaling
at about 8 (BENCHMARKS.md, "Input pipeline"); above ``THREADS_UP_TO`` cores the work goes to
one process per core, each given the function once and sent items in chunks, rows coming back
as uint8 arrays. Each item is tried on its own: one that cannot be read is reported with its
reason and the stream goes on.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import multiprocessing
import os
import sys
import types
from collections import deque
from collections.abc import Callable, Iterable, Iterator
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


def _attempt(fn: Callable[[Item], Result], item: Item) -> Outcome[Item, Result]:
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
) -> Iterator[Outcome[Item, Result]]:
    """``fn`` over ``items`` on ``workers`` threads or processes (default: one per core;
    processes when there are more than THREADS_UP_TO), yielded in the items' order with about
    ``ahead`` items in flight; an item whose ``fn`` raises one of UNREADABLE comes out with the
    error's message instead of a value (anything else is a bug and propagates). With processes,
    ``fn`` and the items are pickled: ``fn`` once per worker, so a callable object holding its
    dataset is sent once."""
    workers = workers or host_threads()
    ahead = ahead or 4 * workers
    if workers > THREADS_UP_TO if processes is None else processes:
        return _process_map(fn, items, workers, ahead)
    return _thread_map(fn, items, workers, ahead)


def _thread_map(fn: Callable[[Item], Result], items: Iterable[Item], threads: int, ahead: int) -> Iterator[Outcome]:
    iterator = iter(items)
    with concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="tresnet-input") as pool:
        pending: deque[concurrent.futures.Future] = deque(
            pool.submit(_attempt, fn, item) for item in itertools.islice(iterator, ahead)
        )
        while pending:
            outcome = pending.popleft().result()
            for item in itertools.islice(iterator, 1):
                pending.append(pool.submit(_attempt, fn, item))
            yield outcome


_worker_fn: Callable[[Any], Any] | None = None


def _install(fn: Callable[[Any], Any]) -> None:
    global _worker_fn
    _worker_fn = fn


def _run_chunk(items: list[Any]) -> list[Outcome]:
    return [_attempt(_worker_fn, item) for item in items]


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


def _process_map(fn: Callable[[Item], Result], items: Iterable[Item], processes: int, ahead: int) -> Iterator[Outcome]:
    # forkserver: workers fork from a fresh server process, not from this one (whose threads,
    # JAX's among them, make fork unsafe); the server imports what they need once.
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
    if context.get_start_method() == "forkserver":
        context.set_forkserver_preload(server_preload(fn))  # ignored once the server runs
    iterator = iter(items)
    chunks = iter(lambda: list(itertools.islice(iterator, CHUNK)), [])
    pool = concurrent.futures.ProcessPoolExecutor(processes, mp_context=context, initializer=_install, initargs=(fn,))
    try:
        # Two chunks a worker at least: one it works on, one waiting, so none idles.
        in_flight = max(2 * processes, ahead // CHUNK)
        pending = deque(pool.submit(_run_chunk, chunk) for chunk in itertools.islice(chunks, in_flight))
        while pending:
            outcomes = pending.popleft().result()
            for chunk in itertools.islice(chunks, 1):
                pending.append(pool.submit(_run_chunk, chunk))
            yield from outcomes
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def stack_rows(rows: list[np.ndarray], size: int) -> np.ndarray:
    """uint8 (len(rows), size, size, 3) from per-image arrays (an empty batch keeps its shape)."""
    out = np.empty((len(rows), size, size, 3), np.uint8)
    for i, row in enumerate(rows):
        out[i] = row
    return out
