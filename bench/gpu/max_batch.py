"""The largest training batch that fits in device memory (the paper's "max train batch size").

Each candidate batch is tried in a fresh process, one framework at a time, so that neither a
previous failure nor the other framework's allocator holds memory: the probe runs two full
training steps, prints what it measured as one JSON line (compile time, peak device memory, the
device's capacity) and exits 0, or 3 when the device ran out of memory. JAX is told not to
preallocate and may grow to 95 % of the device, as PyTorch's caching allocator may.

    python -m bench.gpu.max_batch --framework jax --model tresnet_m --precision bf16 --batch-size 256
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from bench.spec import MODES, PRECISIONS, BenchSpec

EXIT_FITS, EXIT_OUT_OF_MEMORY = 0, 3
KILLED = -9  # the operating system's out-of-memory killer (host memory on CPU)
REPO_ROOT = Path(__file__).resolve().parents[2]
PROBE_ENV = {"XLA_PYTHON_CLIENT_PREALLOCATE": "false", "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.95"}


def largest_fitting(fits: Callable[[int], bool], start: int, limit: int, resolution: int = 1) -> int:
    """Largest b <= limit with fits(b), for a monotone ``fits``: doubling from ``start`` until a
    batch fails, then bisection until the bracket is at most ``resolution`` wide. 0 when even
    batch 1 fails."""
    good, bad = 0, None
    batch = max(1, min(start, limit))
    while bad is None:
        if not fits(batch):
            bad = batch
        elif batch >= limit:
            return batch
        else:
            good, batch = batch, min(2 * batch, limit)
    while bad - good > max(1, resolution):
        middle = (good + bad) // 2
        if fits(middle):
            good = middle
        else:
            bad = middle
    return good


def bounded_search(
    fits: Callable[[int], bool | None], start: int, step: int, limit: int, probes: int, resolution: int = 1
) -> tuple[int | None, int | None]:
    """(largest batch found to fit, smallest found not to) after at most ``probes`` calls of
    ``fits``, starting at ``start`` (a good estimate): up by ``step`` while batches fit, down
    while they do not, then halving the bracket until it is at most ``resolution`` wide.
    ``fits`` returning None ends the search early (no time left)."""
    good, bad = None, None
    batch = max(1, min(start, limit))
    for _ in range(probes):
        fitted = fits(batch)
        if fitted is None:
            break
        good, bad = (batch, bad) if fitted else (good, batch)
        if good is not None and bad is not None:
            if bad - good <= resolution:
                break
            batch = (good + bad) // 2
        elif good is not None:
            if good >= limit:
                break
            batch = min(good + step, limit)
        else:
            if bad <= 1:
                break
            batch = max(bad - step, 1)
    return good, bad


def probe_fits(framework: str, spec: BenchSpec, timeout_s: float) -> bool:
    """Run a training step of ``spec`` in a fresh process; True when it fits in memory."""
    return probe(framework, spec, timeout_s)["fits"]


def probe(framework: str, spec: BenchSpec, timeout_s: float, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Run a training step of ``spec`` in a fresh process (with ``env`` added to its
    environment): ``{"fits": True, ...what it measured}``, or ``{"fits": False}``."""
    command = [
        sys.executable, "-m", "bench.gpu.max_batch", "--framework", framework, "--model", spec.model,
        "--precision", spec.precision, "--batch-size", str(spec.batch_size), "--image-size", str(spec.image_size),
        "--num-classes", str(spec.num_classes),
    ]  # fmt: skip
    env = {
        **os.environ,
        **PROBE_ENV,
        **(env or {}),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
    }
    done = subprocess.run(
        command, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout_s, check=False
    )
    if done.returncode in (EXIT_OUT_OF_MEMORY, KILLED):
        return {"fits": False}
    lines = done.stdout.strip().splitlines()
    if done.returncode == EXIT_FITS and lines:
        return {"fits": True, **json.loads(lines[-1])}
    last = (done.stderr.strip().splitlines() or ["no output"])[-1]
    raise RuntimeError(f"{framework} probe at batch {spec.batch_size} failed (exit {done.returncode}): {last}")


def _probe(framework: str, spec: BenchSpec) -> int:
    """Build and run two training steps, print what was measured; the exit code says whether
    memory sufficed."""
    if framework == "jax":
        import jax

        from bench.jax_side import jax_runner
        from tresnet_jax.runtime.xla_options import compiler_options

        try:
            runner = jax_runner(spec, compiler_options())
            runner.run(1)
        except jax.errors.JaxRuntimeError as err:
            if "RESOURCE_EXHAUSTED" in str(err) or "out of memory" in str(err).lower():
                return EXIT_OUT_OF_MEMORY
            raise
        capacity = (jax.local_devices()[0].memory_stats() or {}).get("bytes_limit")
    else:
        import torch

        from bench.timm_side import timm_runner, torch_device

        device = torch_device()
        try:
            runner = timm_runner(spec, framework.removeprefix("timm_"), device)
            runner.run(1)
        except torch.OutOfMemoryError:
            return EXIT_OUT_OF_MEMORY
        capacity = torch.cuda.mem_get_info(device)[1] if device.type == "cuda" else None
    measured = {
        "first_call_s": runner.first_call_s, "compile_s": runner.compile_s, "peak_memory_bytes": runner.peak_memory(),
        "capacity_bytes": capacity, "compilation_cache": runner.notes.get("compilation_cache"),
    }  # fmt: skip
    print(json.dumps(measured))
    return EXIT_FITS


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--framework", required=True, help="jax, or timm_<variant> (timm_eager, ...)")
    parser.add_argument("--model", default="tresnet_m")
    parser.add_argument("--mode", choices=MODES, default="train")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32")
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--num-classes", type=int, default=1000)
    args = parser.parse_args(argv)
    spec = BenchSpec(args.model, args.mode, args.precision, args.batch_size, args.image_size, args.num_classes)
    return _probe(args.framework, spec)


if __name__ == "__main__":
    sys.exit(main())
