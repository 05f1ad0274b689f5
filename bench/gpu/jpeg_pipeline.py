"""train.py and eval.py as a user runs them, on a folder of real JPEGs and on synthetic data, for
the GPU suite's ``jpeg_pipeline`` section: does the input keep the device busy, and at what cost
in host cores?

Each command runs in a fresh process (its own session, so that a run stopped at the section's
end takes its decoding workers with it), output to a log file. What is read back:
- train.py: the rows of ``workdir/metrics.jsonl`` (``images_per_second`` over each window of
  ``--log-every`` steps); the first rows (compilation, warm-up, the pool filling) are left out and
  the rate is the median of the rest, with the mean over the same window beside it. Any column
  beyond the step's metrics (``host_ms_per_image`` and the like) is kept as its median.
- eval.py: its ``--output`` JSON (``images_per_second``: the loop, first batch included) and the
  steady rate after the first batch, ``(images - batch) / (wall - first batch)``.
- host CPU: user + system seconds of the process and every descendant (its decoding workers),
  sampled from /proc while it runs and interpolated at the ends of the measured window: cores
  busy and core-milliseconds per image in the steady state. Beside it, ``getrusage(RUSAGE_CHILDREN)``
  over the whole command (``..._whole_run``: start-up and XLA compilation included, so an upper
  bound of the steady cost; workers that no process waited for are missing from it).
- lines of the output that mention decoding (which decoder ``--decode auto`` chose, the GPU
  memory its decoder took, when the command says so).

The folder comes from ``bench/synthetic_images.py`` (ImageNet's size distribution, quality 90,
a few progressive JPEGs and PNG bytes named ``.jpg``), written by one process per core in a
process of its own; weights for eval.py are a random initialisation written as a weights
directory (the lent machines reach no hub).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import resource
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[2]
CLASSES = 8  # bench/synthetic_images.py's class folders
# The training step's own metrics and the loop's bookkeeping; other columns are the input's.
STEP_COLUMNS = {"time", "step", "epoch", "accuracy", "finite", "loss", "loss_scale", "lr", "params_finite",
                "images_per_second", "unreadable_images"}  # fmt: skip
DECODING = re.compile(r"decod|nvjpeg", re.IGNORECASE)
MEMORY = re.compile(r"memory|[KMG]i?B\b|bytes", re.IGNORECASE)
ENV_NOTED = (
    "XLA_PYTHON_CLIENT_PREALLOCATE",
    "XLA_PYTHON_CLIENT_MEM_FRACTION",
    "XLA_FLAGS",
    "TRESNET_JAX_COMPILATION_CACHE",
)
TARGETS = {"train_jpeg_over_synthetic": 0.8, "eval_jpeg_over_synthetic": 0.7, "host_core_ms_per_train_image": 1.0}


@dataclasses.dataclass(frozen=True)
class Setup:
    """What every command of the section shares."""

    model: str
    precision: str
    batch: int
    image_size: int
    train_steps: int
    log_every: int
    skip_rows: int  # metrics rows left out of the rate (compilation, warm-up)
    scratch: Path  # images, workdirs, weights (large; not kept)
    logs: Path  # each command's output and metrics (small; kept with the section's JSON)


@dataclasses.dataclass
class Finished:
    """A command that ran: exit code (None: stopped at its time limit), its seconds, its
    children's CPU seconds by getrusage, the /proc samples (time.time(), CPU seconds of its
    process tree), its output."""

    returncode: int | None
    wall_s: float
    rusage_cpu_s: float
    samples: list[tuple[float, float]]
    output: str

    def cpu_between(self, start: float, end: float) -> float | None:
        """CPU seconds of the process tree between two ``time.time()`` instants (interpolated)."""
        if len(self.samples) < 2 or end <= start:
            return None
        times, cpu = zip(*self.samples, strict=True)
        return float(np.interp(end, times, cpu) - np.interp(start, times, cpu))


# --- running a command ---------------------------------------------------------------------------


def run_command(argv: Sequence[str], log: Path, timeout_s: float, env: Mapping[str, str] | None = None) -> Finished:
    """``argv`` in a new session from the repository's root, stdout and stderr to ``log``; after
    ``timeout_s`` its whole process group is killed."""
    environment = {**os.environ, **(env or {})}
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), environment.get("PYTHONPATH")]))
    log.parent.mkdir(parents=True, exist_ok=True)
    before = _children_cpu()
    start = time.perf_counter()
    with log.open("w") as out:
        process = subprocess.Popen(
            list(argv), cwd=REPO_ROOT, env=environment, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        sampler = TreeSampler(process.pid)
        sampler.start()
        try:
            returncode = process.wait(timeout=max(timeout_s, 1.0))
        except subprocess.TimeoutExpired:
            returncode = None
        finally:
            sampler.stop()
            # The group this call started: the command (if it still runs) and any worker it left
            # behind, which would otherwise take cores from the next command.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    return Finished(returncode, time.perf_counter() - start, _children_cpu() - before, sampler.samples, log.read_text())


class TreeSampler(threading.Thread):
    """Samples every ``interval`` s the CPU seconds (user + system, with those of children it
    reaped) of a process and its descendants, from /proc; nothing where there is no /proc."""

    def __init__(self, root: int, interval: float = 0.25):
        super().__init__(daemon=True)
        self.root, self.interval = root, interval
        self.samples: list[tuple[float, float]] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            cpu = tree_cpu_seconds(self.root)
            if cpu is not None:
                self.samples.append((time.time(), cpu))
            self.done.wait(self.interval)

    def stop(self) -> None:
        self.done.set()
        self.join()


def tree_cpu_seconds(root: int) -> float | None:
    """utime + stime + cutime + cstime of ``root`` and its living descendants, in seconds; None
    when ``root`` is gone or there is no /proc."""
    parents, ticks = {}, {}
    try:
        entries = [e.name for e in os.scandir("/proc") if e.name.isdigit()]
    except OSError:
        return None
    for name in entries:
        try:
            text = Path(f"/proc/{name}/stat").read_text()
        except OSError:  # it ended meanwhile
            continue
        fields = text[text.rindex(")") + 2 :].split()  # from field 3 (state): ppid is 4, utime..cstime 14..17
        parents[int(name)] = int(fields[1])
        ticks[int(name)] = sum(int(v) for v in fields[11:15])
    if root not in ticks:
        return None
    children: dict[int, list[int]] = {}
    for pid, parent in parents.items():
        children.setdefault(parent, []).append(pid)
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += ticks.get(pid, 0)
        todo += children.get(pid, [])
    return total / os.sysconf("SC_CLK_TCK")


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _failure(what: str, finished: Finished) -> RuntimeError:
    lines = [line for line in finished.output.strip().splitlines() if line.strip()] or ["no output"]
    return RuntimeError(f"{what} failed (exit {finished.returncode}): {lines[-1]}")


def _decoding_lines(output: str) -> dict[str, list[str] | None]:
    lines = [line.strip() for line in output.splitlines() if DECODING.search(line)]
    memory = [line for line in lines if MEMORY.search(line)]
    return {"decoding_lines": lines[:8] or None, "decoder_memory": memory[:4] or None}


# --- the section's items -------------------------------------------------------------------------


def write_images(
    folder: Path, count: int, progressive: int, png: int, copies: int, log: Path, timeout_s: float
) -> dict[str, Any]:
    """The folder (bench/synthetic_images.py) written by one process per core, in a process of
    its own (no JAX or PyTorch in it: it starts at once); what it wrote and the seconds."""
    workers = os.cpu_count() or 1
    argv = [sys.executable, "-m", "bench.synthetic_images", str(folder), "--count", str(count), "--workers",
            str(workers), "--progressive", str(progressive), "--png", str(png), "--copies", str(copies)]  # fmt: skip
    finished = run_command(argv, log, timeout_s)
    if finished.returncode != 0:
        raise _failure("writing the images", finished)
    written = json.loads(finished.output.strip().splitlines()[-1])
    return {**written, "files": count * copies, "wall_s": finished.wall_s, "host_cpu_s": finished.rusage_cpu_s}


def random_weights(directory: Path, model: str, num_classes: int = CLASSES) -> dict[str, Any]:
    """A weights directory holding ``model``'s random initialisation (what eval.py loads)."""
    from tresnet_jax.model.initialization import random_variables
    from tresnet_jax.model.registry import ARCHITECTURES
    from tresnet_jax.weights.info import WeightsInfo
    from tresnet_jax.weights.storage import save_weights

    variables = random_variables(ARCHITECTURES[model], num_classes, seed=0)
    save_weights(directory, variables, WeightsInfo(model, num_classes), force=True)
    return {"directory": str(directory), "model": model, "num_classes": num_classes}


def train_run(setup: Setup, key: str, data: Sequence[str], flags: Sequence[str], timeout_s: float) -> dict[str, Any]:
    """train.py on ``data`` (``--train_dir F`` or ``--synthetic-data N``) with ``flags``:
    images/s and host CPU of its steady steps (module docstring)."""
    workdir = setup.scratch / f"workdir_{key}"
    argv = [
        sys.executable, str(REPO_ROOT / "train.py"), "--workdir", str(workdir), "--model", setup.model,
        "--num-classes", str(CLASSES), "--precision", setup.precision, "--batch-size", str(setup.batch),
        "--image-size", str(setup.image_size), "--max-steps", str(setup.train_steps),
        "--log-every", str(setup.log_every), "--checkpoint-every", str(setup.train_steps), "--eval-every", "0",
        "--no-progress", *data, *flags,
    ]  # fmt: skip
    finished = run_command(argv, setup.logs / f"{key}.log", timeout_s)
    if finished.returncode not in (0, None):
        raise _failure("train.py", finished)
    metrics = workdir / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line] if metrics.exists() else []
    (setup.logs / f"{key}_metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    compiled = re.search(r"compiled the training step in ([0-9.]+) s", finished.output)
    result = {
        "command": _shown(argv), "returncode": finished.returncode, "wall_s": finished.wall_s,
        "compile_s": float(compiled.group(1)) if compiled else None,
        **training_figures(rows, setup.batch, setup.skip_rows, finished),
        **_decoding_lines(finished.output),
    }  # fmt: skip
    if finished.returncode is None:
        result["stopped"] = f"at the section's end, after {finished.wall_s:.0f} s"
    return result


def training_figures(rows: list[dict[str, Any]], batch: int, skip_rows: int, finished: Finished) -> dict[str, Any]:
    """Images/s of the rows after the first ``skip_rows`` (median of the rows, and the mean over
    their window), host CPU over that window, the other columns' medians; the whole command's
    CPU by getrusage per image trained."""
    steps = int(rows[-1]["step"]) if rows else 0
    figures: dict[str, Any] = {
        "rows": len(rows), "steps": steps, "row_rates": [row.get("images_per_second") for row in rows],
        "unreadable_images": rows[-1].get("unreadable_images") if rows else None,
        "host_cores_whole_run": finished.rusage_cpu_s / finished.wall_s if finished.wall_s > 0 else None,
        "host_core_ms_per_image_whole_run": 1e3 * finished.rusage_cpu_s / (steps * batch) if steps else None,
    }  # fmt: skip
    first = max(skip_rows, 1)  # the window starts where a row ends
    steady = rows[first:]
    if not steady:
        return {**figures, "images_per_s": None, "note": f"no rows after the first {first}"}
    start, end = rows[first - 1]["time"], steady[-1]["time"]
    images = (int(steady[-1]["step"]) - int(rows[first - 1]["step"])) * batch
    cpu = finished.cpu_between(start, end)
    extra = sorted(
        {k for row in steady for k, v in row.items() if k not in STEP_COLUMNS and isinstance(v, int | float)}
    )
    return {
        **figures,
        "images_per_s": statistics.median(row["images_per_second"] for row in steady),
        "images_per_s_window": images / (end - start) if end > start else None,
        "rows_used": len(steady),
        "window_s": end - start,
        "host_cores": cpu / (end - start) if cpu is not None else None,
        "host_core_ms_per_image": 1e3 * cpu / images if cpu is not None and images else None,
        "columns": {k: statistics.median(row[k] for row in steady if k in row) for k in extra},
    }


def eval_run(
    setup: Setup, key: str, data: Sequence[str], flags: Sequence[str], weights: Path, timeout_s: float
) -> dict[str, Any]:
    """eval.py on ``data`` (``--val_dir F`` or ``--synthetic-data N``) with ``flags``: its
    images/s, the steady rate after the first batch, host CPU over the loop after it."""
    output = setup.logs / f"{key}.json"
    logits = ["--save-logits", str(setup.logs / f"{key}.npz")] if "--val_dir" in data else []
    argv = [
        sys.executable, str(REPO_ROOT / "eval.py"), "--weights", str(weights), "--precision",
        setup.precision, "--batch-size", str(setup.batch), "--image-size", str(setup.image_size),
        "--no-progress", "--output", str(output), *logits, *data, *flags,
    ]  # fmt: skip
    finished = run_command(argv, setup.logs / f"{key}.log", timeout_s)
    if finished.returncode is None:
        raise TimeoutError(f"eval.py stopped at the section's end, after {finished.wall_s:.0f} s")
    if finished.returncode != 0:
        raise _failure("eval.py", finished)
    report = json.loads(output.read_text())
    images, wall, first = report["images"], report["wall_seconds"], report["first_batch_seconds"]
    steady_s = wall - first
    end = output.stat().st_mtime  # written just after the loop
    cpu = finished.cpu_between(end - steady_s, end)
    counted = images - min(setup.batch, images)
    return {
        "command": _shown(argv), "wall_s": finished.wall_s, "images": images,
        "images_per_s": report["images_per_second"],
        "images_per_s_steady": counted / steady_s if steady_s > 0 and counted else None,
        "compile_s": report["compile_seconds"], "first_batch_s": first, "loop_s": wall,
        "setup_s": report.get("setup_seconds"), "skipped_images": report["skipped"],
        "host_cores": cpu / steady_s if cpu is not None else None,
        "host_core_ms_per_image": 1e3 * cpu / counted if cpu is not None and counted else None,
        "host_cores_whole_run": finished.rusage_cpu_s / finished.wall_s,
        **_decoding_lines(finished.output),
    }  # fmt: skip


def logits_agreement(got: Path, reference: Path) -> dict[str, Any]:
    """eval.py's saved logits on the GPU path (``got``) against the PIL path's (``reference``),
    over the images both read: max |difference| / max |reference|, the relative L2 error, and
    the share of images whose top-1 class is the same."""
    with np.load(got) as a, np.load(reference) as b:
        first, second = a["logits"].astype(np.float64), b["logits"].astype(np.float64)
    both = ~np.isnan(first).any(1) & ~np.isnan(second).any(1)
    first, second = first[both], second[both]
    return {
        "images": int(both.sum()),
        "max_abs_over_max_abs": float(np.abs(first - second).max() / np.abs(second).max()),
        "relative_l2": float(np.linalg.norm(first - second) / np.linalg.norm(second)),
        "top1_agreement": float(np.mean(first.argmax(1) == second.argmax(1))),
    }


def ratios(results: Mapping[str, Any]) -> dict[str, Any]:
    """The section's verdicts: train.py and eval.py on JPEGs over the same on synthetic data (eval:
    steady rates), host core-ms per training image; None where a run is missing."""

    def rate(key: str, steady: bool = False) -> float | None:
        value = results.get(key)
        if not isinstance(value, dict):
            return None
        return (value.get("images_per_s_steady") if steady else None) or value.get("images_per_s")

    def over(a: float | None, b: float | None) -> float | None:
        return a / b if a and b else None

    found = {
        "train_jpeg_over_synthetic": over(rate("train_jpeg"), rate("train_synthetic")),
        "eval_jpeg_over_synthetic": over(rate("eval_jpeg", True), rate("eval_synthetic", True)),
        "host_core_ms_per_train_image": (results.get("train_jpeg") or {}).get("host_core_ms_per_image"),
        "train_jpeg_host_over_synthetic": over(rate("train_jpeg_host"), rate("train_synthetic")),
        "eval_jpeg_host_over_synthetic": over(rate("eval_jpeg_host", True), rate("eval_synthetic", True)),
    }
    met = {name: _meets(name, found[name], target) for name, target in TARGETS.items()}
    return {**found, "targets": dict(TARGETS), "target_met": met}


def _meets(name: str, value: float | None, target: float) -> bool | None:
    """Ratios must reach their target; host costs (``host_...``) must stay at or under it."""
    if value is None:
        return None
    return value <= target if name.startswith("host") else value >= target


def noted_environment() -> dict[str, str | None]:
    return {name: os.environ.get(name) for name in ENV_NOTED}


def _shown(argv: Sequence[str]) -> str:
    """The command as a person would type it (the interpreter and repository root left out)."""
    shown = [
        Path(a).name if a in (sys.executable, str(REPO_ROOT / "train.py"), str(REPO_ROOT / "eval.py")) else a
        for a in argv
    ]
    return " ".join(shown)
