"""Run one command line as N cooperating JAX processes on this machine, the way a multi-host
job runs one process per host, for tests of multi-host code on CPU.

    results = run_processes(
        [sys.executable, "eval.py", "--val_dir", folder],
        num_processes=2,
        env={"XLA_FLAGS": "--xla_force_host_platform_device_count=2"},  # devices per process
        timeout=240,
    )
    assert all(r.returncode == 0 for r in results), describe(results)

Each copy gets ``--coordinator 127.0.0.1:PORT --num-processes N --process-id I`` appended,
the flags of ``tresnet_jax.runtime.parallel.initialize_distributed``; ``flags=`` changes that, e.g. to
give each process its own arguments as well:

    flags=lambda address, n, i: coordinator_flags(address, n, i) + ["--workdir", f"run/{i}"]

The processes run concurrently; when one fails, or the timeout passes, the others are
killed (they would otherwise wait for it in a collective until JAX's own timeouts).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Collection, Mapping, Sequence


@dataclasses.dataclass
class ProcessResult:
    process_id: int
    returncode: int  # negative: ended by that signal
    stdout: str
    stderr: str
    killed: str | None = None  # why the launcher killed it ("timeout after 60 s", "process 1 failed")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it; another program
    could still take it before the coordinator binds it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def coordinator_flags(address: str, num_processes: int, process_id: int) -> list[str]:
    """The arguments that make process ``process_id`` join the job (eval.py's)."""
    return ["--coordinator", address, "--num-processes", str(num_processes), "--process-id", str(process_id)]


def run_processes(
    command: Sequence[object],
    num_processes: int,
    env: Mapping[str, str | None] | None = None,
    timeout: float = 300.0,
    cwd: str | os.PathLike | None = None,
    flags: Callable[[str, int, int], Sequence[object]] | None = None,
    on_start: Callable[[list[subprocess.Popen]], None] | None = None,
    exit_codes: Collection[int] = (0,),
) -> list[ProcessResult]:
    """Start ``num_processes`` copies of ``command`` (its items are turned into strings: paths
    and numbers can be passed as they are) joined by a coordinator on a free localhost
    port, wait for all of them, and return their results in process order.

    ``env`` is applied on top of this process's environment (a value of None removes the
    variable); ``timeout`` bounds the whole run, in seconds; ``flags(address, n, i)`` returns the
    arguments appended for process ``i`` (default: ``coordinator_flags``); ``on_start(processes)``
    is called once all are started. A process ending with a code outside ``exit_codes`` has the
    others killed. Output goes through temporary files, so a chatty process cannot block on a
    full pipe.
    """
    if num_processes < 1:
        raise ValueError(f"num_processes must be at least 1, got {num_processes}")
    address = f"127.0.0.1:{free_port()}"
    flags = flags or coordinator_flags
    environment = dict(os.environ)
    for key, value in (env or {}).items():
        if value is None:
            environment.pop(key, None)
        else:
            environment[key] = value
    processes: list[subprocess.Popen] = []
    killed: dict[int, str] = {}
    with contextlib.ExitStack() as files:
        outputs = [
            (files.enter_context(tempfile.TemporaryFile()), files.enter_context(tempfile.TemporaryFile()))
            for _ in range(num_processes)
        ]
        try:
            for i, (out, err) in enumerate(outputs):
                argv = [str(part) for part in (*command, *flags(address, num_processes, i))]
                # A session of its own: killing its process group reaches anything it started.
                processes.append(
                    subprocess.Popen(argv, stdout=out, stderr=err, env=environment, cwd=cwd, start_new_session=True)
                )
            if on_start is not None:
                on_start(processes)
            deadline = time.monotonic() + timeout
            while any(p.poll() is None for p in processes):
                failed = next((i for i, p in enumerate(processes) if p.returncode not in (None, *exit_codes)), None)
                if failed is not None:
                    reason = f"process {failed} failed"
                elif time.monotonic() > deadline:
                    reason = f"timeout after {timeout:g} s"
                else:
                    time.sleep(0.1)
                    continue
                for i, p in enumerate(processes):
                    if p.poll() is None:
                        killed[i] = reason
                        _kill(p)
        finally:
            for i, p in enumerate(processes):  # still running only if the launcher itself failed
                if p.poll() is None:
                    killed.setdefault(i, "launcher error")
                    _kill(p)
        return [
            ProcessResult(i, p.returncode, _read(out), _read(err), killed.get(i))
            for i, (p, (out, err)) in enumerate(zip(processes, outputs, strict=True))
        ]


def describe(results: Sequence[ProcessResult], tail: int = 3000) -> str:
    """Exit codes and the end of each process's output, for assertion messages."""
    parts = []
    for r in results:
        status = f"exit {r.returncode}" + (f", killed: {r.killed}" if r.killed else "")
        parts.append(f"--- process {r.process_id} ({status})\nstdout:\n{r.stdout[-tail:]}\nstderr:\n{r.stderr[-tail:]}")
    return "\n".join(parts)


def _kill(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):  # its group is gone already
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def _read(file) -> str:
    file.seek(0)
    return file.read().decode(errors="replace")
