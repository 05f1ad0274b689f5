"""Where a test run's time went, printed at its end (a pytest plugin, loaded by conftest.py).

For each test (set-up, call and tear-down together): its wall time, the CPU time of the worker
process, the seconds XLA spent compiling in that process (JAX's ``backend_compile_duration``
events, each program's function name and seconds kept in the JSON), and the CPU time of the
processes it started and waited for (``RUSAGE_CHILDREN``: train.py runs, the notebook's kernel).
Under pytest-xdist every worker sends its rows to the controller, which prints:

- per worker: its tests, busy and idle seconds (idle: from its last test to the end of the run),
  XLA compile seconds, children's CPU seconds;
- the slowest files, with the same columns.

``--timings-json PATH`` also writes every row, for a before/after comparison;
``--store-durations`` writes each file's seconds to tests/durations.json, from which the
collection is ordered so that the longest files go to the workers first.
"""

from __future__ import annotations

import json
import os
import resource
import time
from collections import defaultdict
from pathlib import Path

import pytest

DURATIONS = Path(__file__).with_name("durations.json")
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"
FILES_SHOWN = 12


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--timings-json", help="write each test's wall, CPU, compile and children's CPU seconds here")
    parser.addoption("--store-durations", action="store_true", help=f"write each file's seconds to {DURATIONS.name}")


class _Clock:
    """Seconds of XLA compilation in this process since it started listening."""

    def __init__(self) -> None:
        self.compile_s = 0.0
        self.programs: list[tuple[str, float]] = []  # (function, seconds) of each compilation
        self.cache_hits = 0  # of those, read back from the persistent cache

    def listen(self) -> None:
        import jax

        def on_duration(event: str, duration: float, fun_name: object = None, **_: object) -> None:
            if event == COMPILE_EVENT:
                self.compile_s += duration
                self.programs.append((str(fun_name), round(duration, 3)))

        def on_event(event: str, **_: object) -> None:
            if event == CACHE_HIT_EVENT:
                self.cache_hits += 1

        jax.monitoring.register_event_duration_secs_listener(on_duration)
        jax.monitoring.register_event_listener(on_event)


def _cpu(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


class Timings:
    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
        self.clock = _Clock()
        self.rows: list[dict] = []
        self.started: dict[str, tuple[float, float, float, float]] = {}
        self.session_start = time.time()
        # Under xdist the controller sees every test's start and finish too: the workers time them.
        self.timing = "PYTEST_XDIST_WORKER" in os.environ or not getattr(config.option, "numprocesses", None)

    @pytest.hookimpl(tryfirst=True)
    def pytest_sessionstart(self, session: pytest.Session) -> None:
        self.clock.listen()

    def pytest_runtest_logstart(self, nodeid: str, location: object) -> None:
        if not self.timing:
            return
        now = (time.time(), _cpu(resource.RUSAGE_SELF), self.clock.compile_s, _cpu(resource.RUSAGE_CHILDREN))
        self.started[nodeid] = now
        self.clock.programs.clear()
        self.clock.cache_hits = 0

    def pytest_runtest_logfinish(self, nodeid: str, location: object) -> None:
        if not self.timing:
            return
        start, cpu, compile_s, children = self.started.pop(nodeid)
        self.rows.append({
            "test": nodeid, "worker": self.worker, "start": start, "wall": time.time() - start,
            "cpu": _cpu(resource.RUSAGE_SELF) - cpu, "compile": self.clock.compile_s - compile_s,
            "children_cpu": _cpu(resource.RUSAGE_CHILDREN) - children, "programs": list(self.clock.programs),
            "cache_hits": self.clock.cache_hits,
        })  # fmt: skip

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        workeroutput = getattr(self.config, "workeroutput", None)
        if workeroutput is not None:  # an xdist worker: the controller reports
            workeroutput["timings"] = json.dumps(self.rows)

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node: object, error: object) -> None:
        rows = getattr(node, "workeroutput", {}).get("timings")
        if rows:
            self.rows += json.loads(rows)

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        if not self.rows or hasattr(self.config, "workeroutput"):
            return
        end = time.time()
        write = terminalreporter.write_line
        terminalreporter.section("where the time went")
        columns = ("wall", "cpu", "compile", "children_cpu")
        header = f"{'':<44}{'tests':>6}{'wall s':>9}{'CPU s':>8}{'XLA compile s':>15}{'children CPU s':>16}"
        write(header + f"{'idle at end s':>15}")
        by_worker: dict[str, list[dict]] = defaultdict(list)
        for row in self.rows:
            by_worker[row["worker"]].append(row)
        for worker, rows in sorted(by_worker.items()):
            idle = end - max(r["start"] + r["wall"] for r in rows)
            write(_line(worker, rows, columns) + f"{idle:15.0f}")
        write(_line("all", self.rows, columns) + f"{'':>15}" + f"   run {end - self.session_start:.0f} s")
        by_file: dict[str, list[dict]] = defaultdict(list)
        for row in self.rows:
            by_file[row["test"].split("::")[0]].append(row)
        slowest = sorted(by_file.items(), key=lambda item: -sum(r["wall"] for r in item[1]))[:FILES_SHOWN]
        write("slowest files:")
        for name, rows in slowest:
            write(_line(name, rows, columns))
        path = self.config.getoption("--timings-json")
        if path:
            Path(path).write_text(json.dumps(self.rows, indent=1) + "\n")
        if self.config.getoption("--store-durations"):
            seconds = {name: round(sum(r["wall"] for r in rows), 1) for name, rows in sorted(by_file.items())}
            DURATIONS.write_text(json.dumps(seconds, indent=1) + "\n")


def file_durations() -> dict[str, float]:
    """Each test file's seconds in the run that stored them (tests/durations.json)."""
    try:
        return json.loads(DURATIONS.read_text())
    except (OSError, ValueError):
        return {}


def _line(name: str, rows: list[dict], columns: tuple[str, ...]) -> str:
    totals = [sum(r[c] for r in rows) for c in columns]
    return f"{name:<44}{len(rows):>6}{totals[0]:9.0f}{totals[1]:8.0f}{totals[2]:15.0f}{totals[3]:16.0f}"


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(Timings(config), "tresnet_timings")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The longest files first (tests/durations.json, a file not in it last), in their own order
    within: pytest-xdist hands the files out in this order, so the last to start is short."""
    seconds = file_durations()
    root = config.rootpath
    items.sort(key=lambda item: -seconds.get(item.path.relative_to(root).as_posix(), 0.0))
