"""Inference throughput of the exports on this machine's CPU, next to the library's own forward.

    python bench/export_throughput.py                      # tresnet_m, 224x224, batch 8, float32
    python bench/export_throughput.py --batch-size 1 --output runs/export_throughput.json

Three runners in one process, on the same synthetic batch: ``jax`` (the library's forward,
compiled with its CPU options, as eval.py runs it), ``stablehlo`` (the deserialized
``jax.export`` file called as a user would, compiled with XLA's defaults) and ``onnxruntime``
(the ONNX file on onnxruntime's CPU provider, default session options). The weights are a
fresh model's: speed does not depend on their values. The runners take turns window by window
and each keeps its median window (bench/timing.py). Also printed: each export's largest
|logit| difference from the library's forward on the timed batch.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import json
import time
from collections.abc import Sequence
from importlib import metadata
from typing import Any

import jax
import numpy as np

import tresnet_jax
from bench.jax_side import jax_runner
from bench.report import cpu_cores, cpu_model
from bench.spec import BenchSpec, synthetic_batch, validate
from bench.timing import Runner, time_runners
from tresnet_jax.cli import command
from tresnet_jax.errors import InputError
from tresnet_jax.export import INPUT_NAME, onnx_model, stablehlo_export
from tresnet_jax.runtime.xla_options import compiler_options


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model", default="tresnet_m", help="tresnet_m, tresnet_l, tresnet_xl, tresnet_v2_l, tresnet_l_v2"
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per runner")
    parser.add_argument("--windows", type=int, default=5, help="timed windows per runner (the median is kept)")
    parser.add_argument("--steps", type=int, default=1, help="steps per window")
    parser.add_argument("--output", type=Path, help="also write the figures to this JSON file")
    return parser.parse_args(argv)


def stablehlo_runner(model: tresnet_jax.TResNet, variables: Any, images: np.ndarray) -> tuple[Runner, np.ndarray]:
    """The serialized export, deserialized and called: (runner, its logits of ``images``)."""
    start = time.perf_counter()
    forward = jax.jit(jax.export.deserialize(stablehlo_export(model, variables, images.shape[1])).call)
    batch = jax.device_put(images)
    logits = np.asarray(forward(batch))

    def run(steps: int) -> None:
        jax.block_until_ready([forward(batch) for _ in range(steps)])

    return Runner("stablehlo", "jax", run, time.perf_counter() - start), logits


def onnxruntime_runner(model: tresnet_jax.TResNet, variables: Any, images: np.ndarray) -> tuple[Runner, np.ndarray]:
    """The ONNX export on onnxruntime's CPU provider: (runner, its logits of ``images``)."""
    import onnxruntime as ort

    start = time.perf_counter()
    proto = onnx_model(model, variables, images.shape[1], {})
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    feed = {INPUT_NAME: np.ascontiguousarray(images.transpose(0, 3, 1, 2))}
    (logits,) = session.run(None, feed)

    def run(steps: int) -> None:
        for _ in range(steps):
            session.run(None, feed)

    return Runner("onnxruntime", "onnxruntime", run, time.perf_counter() - start), logits


@command
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    spec = validate(BenchSpec(args.model, "infer", "fp32", args.batch_size, args.image_size))
    if min(args.windows, args.steps) < 1 or args.warmup < 0:
        raise InputError("--windows and --steps must be >= 1, --warmup >= 0")
    model, variables = tresnet_jax.create_model(spec.model, num_classes=spec.num_classes)
    images, _ = synthetic_batch(spec)
    reference = np.asarray(jax.jit(model.apply)(variables, images))
    stablehlo, stablehlo_logits = stablehlo_runner(model, variables, images)
    onnx, onnx_logits = onnxruntime_runner(model, variables, images)
    runners = [jax_runner(spec, compiler_options()), stablehlo, onnx]
    timings, other_load = time_runners(runners, args.warmup, args.windows, args.steps)
    jax_s = timings["jax"].step_s
    rows = [
        {
            "runner": r.name,
            "images_per_s": spec.batch_size / timings[r.name].step_s,
            "vs_jax": jax_s / timings[r.name].step_s,
            "spread": timings[r.name].spread,
            "first_call_s": r.first_call_s,
        }
        for r in runners
    ]
    scale = max(1.0, float(np.abs(reference).max()))
    differences = {
        name: float(np.abs(logits - reference).max()) / scale
        for name, logits in (("stablehlo", stablehlo_logits), ("onnxruntime", onnx_logits))
    }
    machine = f"{cpu_model()}, {cpu_cores()} cores"
    print(f"{spec.model}, {spec.image_size}x{spec.image_size}, batch {spec.batch_size}, float32 on {machine}")
    print("| runner | img/s | ÷ jax | window spread | first call (s) |\n|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['runner']} | {row['images_per_s']:.1f} | {row['vs_jax']:.2f}× | "
            f"{row['spread']:.0%} | {row['first_call_s']:.1f} |"
        )
    print("max |logit - jax| / max(1, max |jax logit|): " + ", ".join(f"{k} {v:.1e}" for k, v in differences.items()))
    if other_load is not None:
        print(f"other processes kept {other_load:.2f} cores busy meanwhile")
    if args.output:
        versions = {name: metadata.version(name) for name in ("jax", "jaxlib", "onnx", "onnxruntime")}
        document = {
            "spec": vars(spec),
            "machine": machine,
            "versions": versions,
            "other_load_cores": other_load,
            "rows": rows,
            "relative_max_difference": differences,
        }
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(document, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
