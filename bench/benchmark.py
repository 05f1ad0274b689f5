"""Throughput of the JAX TResNet against timm's, in one run on the same device.

    python bench/benchmark.py --model tresnet_m --mode train --precision bf16 --batch-size 256 --compare timm
    python bench/benchmark.py --mode infer --batch-size 64 --sweep --compare timm     # batch 1, 2, 4, ... 64 + plot
    python bench/benchmark.py --mode train --precision bf16 --find-max-batch --compare timm

JAX: the model jitted (the training step also donates its state); timm: eager NCHW,
channels_last and torch.compile (where it works), autocast for bf16/fp16. Warm-up steps are
not timed; the runners take turns window by window and each keeps its median window, the device
synchronised at the end of every window. Results go to --output as JSON (and a PNG plot for
--sweep); the table is printed. JAX's persistent compilation cache is on unless
--no-compilation-cache or TRESNET_JAX_COMPILATION_CACHE=off.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# PyTorch shares the GPU with JAX in this process: JAX must not take most of it up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import gc
from collections.abc import Sequence
from typing import Any

import jax
import torch

from bench.gpu.max_batch import largest_fitting, probe_fits
from bench.jax_side import jax_runner
from bench.report import (
    add_speedups,
    cpu_cores,
    device_name,
    environment,
    failure_row,
    markdown_table,
    plot_sweep,
    result_row,
    write_json,
)
from bench.spec import MODES, PRECISIONS, BenchSpec, validate
from bench.timing import Runner, time_runners
from bench.timm_side import TIMM_VARIANTS, timm_runner, torch_device
from tresnet_jax.cli import command, enable_compilation_cache
from tresnet_jax.errors import InputError
from tresnet_jax.runtime.xla_options import compiler_options


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model", default="tresnet_m", help="tresnet_m, tresnet_l, tresnet_xl, tresnet_v2_l, tresnet_l_v2"
    )
    parser.add_argument("--mode", choices=MODES, default="infer")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32", help="compute precision (timm: autocast)")
    parser.add_argument("--batch-size", type=int, default=8, help="batch size (--sweep: the largest)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--compare", choices=["timm"], help="also time timm's model")
    parser.add_argument(
        "--timm-variants",
        default="eager,channels_last,compile",
        help=f"comma-separated, of: {', '.join(TIMM_VARIANTS)}",
    )
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per runner")
    parser.add_argument("--windows", type=int, default=5, help="timed windows per runner (the median is kept)")
    parser.add_argument("--steps", type=int, help="steps per window (default: 1 on CPU, 10 on an accelerator)")
    parser.add_argument("--sweep", action="store_true", help="every batch size of --batch-sizes, JSON rows and a plot")
    parser.add_argument("--batch-sizes", help="comma-separated (default: powers of two up to --batch-size)")
    parser.add_argument("--find-max-batch", action="store_true", help="largest training batch that fits, per framework")
    parser.add_argument("--max-batch-limit", type=int, default=1024, help="largest batch --find-max-batch tries")
    parser.add_argument("--max-batch-resolution", type=int, default=8, help="stop bisecting at this bracket width")
    parser.add_argument(
        "--probe-timeout", type=float, default=1800.0, help="seconds one --find-max-batch probe may take"
    )
    parser.add_argument("--threads", type=int, default=cpu_cores(), help="PyTorch CPU threads (default: all cores)")
    parser.add_argument("--output", type=Path, default=Path("runs/bench"), help="directory for the JSON and PNG")
    parser.add_argument("--no-compilation-cache", action="store_true", help="compile from scratch every time")
    parser.add_argument(
        "--xla-defaults", action="store_true", help="compile with XLA's default options (CPU: YNNPACK convolutions)"
    )
    parser.add_argument(
        "--also-xla-defaults", action="store_true", help="CPU: also time JAX compiled with XLA's default options"
    )
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> tuple[BenchSpec, list[str], list[int]]:
    """The spec, the timm variants to run and the batch sizes, or an InputError."""
    spec = validate(
        BenchSpec(args.model, args.mode, args.precision, args.batch_size, args.image_size, args.num_classes)
    )
    if args.warmup < 0:
        raise InputError(f"--warmup must be >= 0, got {args.warmup}")
    positive = {
        "--windows": args.windows, "--steps": args.steps, "--threads": args.threads,
        "--max-batch-limit": args.max_batch_limit, "--max-batch-resolution": args.max_batch_resolution,
    }  # fmt: skip
    for name, value in positive.items():
        if value is not None and value < 1:
            raise InputError(f"{name} must be >= 1, got {value}")
    variants = [v for v in args.timm_variants.split(",") if v] if args.compare else []
    unknown = [v for v in variants if v not in TIMM_VARIANTS]
    if unknown:
        raise InputError(f"unknown timm variant {unknown[0]!r}; known: {', '.join(TIMM_VARIANTS)}")
    return spec, variants, batch_sizes(args)


def batch_sizes(args: argparse.Namespace) -> list[int]:
    if not args.sweep:
        return [args.batch_size]
    if args.batch_sizes is None:
        return [2**i for i in range(args.batch_size.bit_length()) if 2**i <= args.batch_size]
    try:
        sizes = sorted({int(s) for s in args.batch_sizes.split(",") if s.strip()})
    except ValueError:
        raise InputError(f"--batch-sizes must be comma-separated integers, got {args.batch_sizes!r}") from None
    if not sizes or sizes[0] < 1:
        raise InputError(f"--batch-sizes must be integers >= 1, got {args.batch_sizes!r}")
    return sizes


def build_runners(
    spec: BenchSpec, variants: list[str], device: torch.device, args: argparse.Namespace
) -> tuple[list[Runner], list[dict]]:
    """JAX first, then each timm variant; a torch.compile that fails here becomes a failure row."""
    runners = [jax_runner(spec, compiler_options(args.xla_defaults))]
    if args.also_xla_defaults and compiler_options():
        runners.append(jax_runner(spec, {}, name="jax_xla_defaults"))
    failures = []
    for variant in variants:
        built = timm_runner_or_failure(spec, variant, device)
        (runners if isinstance(built, Runner) else failures).append(built)
    return runners, failures


def timm_runner_or_failure(spec: BenchSpec, variant: str, device: torch.device) -> Runner | dict:
    """timm's runner; for a torch.compile variant that cannot compile here, a failure row."""
    if not TIMM_VARIANTS[variant][1]:
        return timm_runner(spec, variant, device)
    try:
        return timm_runner(spec, variant, device)
    except Exception as err:  # noqa: BLE001 - torch.compile fails in many ways (no compiler, unsupported op)
        first_line = (str(err).splitlines() or [""])[0]
        return failure_row(spec, f"timm_{variant}", f"{type(err).__name__}: {first_line}")


def measure(
    spec: BenchSpec, variants: list[str], device: torch.device, args: argparse.Namespace
) -> list[dict[str, Any]]:
    """Rows for one batch size: every runner built, timed side by side, then released."""
    runners, failures = build_runners(spec, variants, device, args)
    steps = args.steps or (1 if jax.default_backend() == "cpu" else 10)
    timings, other_load = time_runners(runners, args.warmup, args.windows, steps)
    rows = [{**result_row(spec, runner, timings[runner.name]), "other_load_cores": other_load} for runner in runners]
    rows += failures
    del runners
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def find_max_batch(spec: BenchSpec, variants: list[str], args: argparse.Namespace) -> dict[str, int]:
    """Largest training batch per framework (timm: eager, NCHW), each probe in its own process."""
    train = BenchSpec(spec.model, "train", spec.precision, 1, spec.image_size, spec.num_classes)
    frameworks = ["jax"] + (["timm_eager"] if variants else [])
    return {
        name: largest_fitting(
            lambda b, name=name: probe_fits(name, train.with_batch(b), args.probe_timeout),
            start=min(args.batch_size, args.max_batch_limit),
            limit=args.max_batch_limit,
            resolution=args.max_batch_resolution,
        )
        for name in frameworks
    }


def output_stem(spec: BenchSpec, args: argparse.Namespace) -> str:
    if args.find_max_batch:
        return f"{spec.model}_train_{spec.precision}_{spec.image_size}px_maxbatch"
    kind = "sweep" if args.sweep else f"b{spec.batch_size}"
    return f"{spec.model}_{spec.mode}_{spec.precision}_{spec.image_size}px_{kind}"


@command
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    spec, variants, sizes = check_args(args)
    cache_dir = None if args.no_compilation_cache else enable_compilation_cache()
    torch.set_num_threads(args.threads)
    device = torch_device()
    document: dict[str, Any] = {
        "environment": environment(str(device), torch.get_num_threads(), cache_dir),
        "config": {**vars(args), "output": str(args.output), "batch_sizes": sizes, "timm_variants": variants},
    }
    stem = args.output / output_stem(spec, args)
    if args.find_max_batch:
        document["max_batch"] = find_max_batch(spec, variants, args)
        print("max training batch:", ", ".join(f"{k} {v}" for k, v in document["max_batch"].items()))
    else:
        rows = add_speedups([row for size in sizes for row in measure(spec.with_batch(size), variants, device, args)])
        document["results"] = rows
        print(markdown_table(rows))
        if args.sweep:
            where = device_name(document["environment"])
            title = f"{spec.model} {spec.mode} {spec.precision} {spec.image_size}px, {where}"
            print(f"wrote {plot_sweep(stem.with_suffix('.png'), rows, title)}")
    print(f"wrote {write_json(stem.with_suffix('.json'), document)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
