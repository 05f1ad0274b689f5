"""What a benchmark run writes: the environment, one row per runner and batch size, JSON, a
Markdown table and the throughput plot."""

from __future__ import annotations

import datetime
import json
import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

import jax

from bench.spec import BenchSpec
from bench.timing import Runner, Timing

PACKAGES = ("jax", "jaxlib", "flax", "optax", "numpy", "torch", "timm")


def cpu_model() -> str:
    """The processor's name as /proc/cpuinfo gives it (else what platform knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_cores() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def environment(torch_device: str, torch_threads: int, cache_dir: str | None) -> dict[str, Any]:
    """Device, software versions and settings that the figures depend on."""
    device = jax.local_devices()[0]
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "jax_backend": jax.default_backend(),
        "jax_device": device.device_kind,
        "torch_device": torch_device,
        "cpu": cpu_model(),
        "cpu_cores": cpu_cores(),
        "torch_threads": torch_threads,
        "python": platform.python_version(),
        "versions": {name: _version(name) for name in PACKAGES},
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "compilation_cache": cache_dir,
    }


def device_name(env: dict[str, Any]) -> str:
    """The device the JAX figures come from, as a person would name it."""
    if env["jax_backend"] == "cpu":
        return f"{env['cpu']}, {env['cpu_cores']} cores"
    return env["jax_device"]


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def result_row(spec: BenchSpec, runner: Runner, timing: Timing) -> dict[str, Any]:
    """One runner at one batch size."""
    return {
        **_spec_fields(spec),
        "runner": runner.name,
        "framework": runner.framework,
        "images_per_s": spec.batch_size / timing.step_s,
        "step_ms": timing.step_s * 1e3,
        "windows_ms": [t * 1e3 for t in timing.windows_s],
        "spread": timing.spread,
        "first_call_s": runner.first_call_s,
        "compile_s": runner.compile_s,
        "peak_memory_bytes": runner.peak_memory(),
        **runner.notes,
    }


def failure_row(spec: BenchSpec, runner_name: str, error: str) -> dict[str, Any]:
    """A runner that could not run here (say, torch.compile without a working compiler)."""
    return {**_spec_fields(spec), "runner": runner_name, "error": error}


def _spec_fields(spec: BenchSpec) -> dict[str, Any]:
    return {
        "model": spec.model,
        "mode": spec.mode,
        "precision": spec.precision,
        "batch_size": spec.batch_size,
        "image_size": spec.image_size,
    }


def add_speedups(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Give every row ``jax_speedup``: JAX images/s over this row's, at the same batch size."""
    jax_rate = {r["batch_size"]: r["images_per_s"] for r in rows if r["runner"] == "jax" and "images_per_s" in r}
    for row in rows:
        if "images_per_s" in row and row["batch_size"] in jax_rate:
            row["jax_speedup"] = jax_rate[row["batch_size"]] / row["images_per_s"]
    return rows


def write_json(path: Path, document: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2) + "\n")
    return path


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The rows as a Markdown table, the way BENCHMARKS.md shows them."""
    lines = [
        "| runner | batch | images/s | ms/step | window spread | other load (cores) | first call (s) "
        "| peak memory (MiB) | JAX ÷ this |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['runner']} | {r['batch_size']} | failed: {r['error']} | | | | | | |")
            continue
        memory, load = r.get("peak_memory_bytes"), r.get("other_load_cores")
        lines.append(
            f"| {r['runner']} | {r['batch_size']} | {r['images_per_s']:.2f} | {r['step_ms']:.1f} | {r['spread']:.0%} | "
            f"{'–' if load is None else f'{load:.2f}'} | {r['first_call_s']:.1f} | "
            f"{'–' if memory is None else f'{memory / 2**20:.0f}'} | {r.get('jax_speedup', float('nan')):.2f}× |"
        )
    return "\n".join(lines)


def plot_sweep(path: Path, rows: list[dict[str, Any]], title: str) -> Path:
    """Images/s against batch size, one line per runner, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for runner in dict.fromkeys(r["runner"] for r in rows):
        points = sorted(
            (r["batch_size"], r["images_per_s"]) for r in rows if r["runner"] == runner and "images_per_s" in r
        )
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", label=runner)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel("images / s")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
