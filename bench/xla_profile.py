"""Where the JAX model's time goes: one step under the JAX profiler, each traced op matched to
the instruction of the compiled XLA program it ran, grouped by what that instruction computes.

    python bench/xla_profile.py --mode train --batch-size 8 --top 30

Forward and backward ops are told apart by their source location (``transpose(jvp(...))`` is
the backward pass); convolutions and dots are split into forward, input-gradient and
weight-gradient by their shapes. Written against XLA:CPU's op events, where ops that XLA runs
on its Eigen thread pool (its own convolutions, some dots) record no event: compare the op
total with the wall time. On a GPU the same names appear on the device's op line.
"""

from __future__ import annotations

import dataclasses
import re
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse

import jax
import optax

from bench.jax_side import TrainState, benchmarked, initialised, make_train_step
from bench.spec import MODES, PRECISIONS, BenchSpec, synthetic_batch, validate
from tresnet_jax.cli import command, enable_compilation_cache
from tresnet_jax.runtime.xla_options import compiler_options

_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\S+?)(?:\{[^}]*\})? ([\w-]+)\((.*)$")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) \(.*\{$")


@dataclasses.dataclass(frozen=True)
class Op:
    """One instruction of the compiled program's entry computation."""

    name: str
    category: str
    shape: str
    source: str  # the JAX op it came from, module path included


def program_ops(hlo_text: str) -> dict[str, Op]:
    """The entry computation's instructions, by name, each with a category."""
    bodies = _computations(hlo_text)
    entry = bodies.get("ENTRY", [])
    # A gradient whose output has a parameter's shape (up to a transpose) is a weight gradient.
    parameters = {_dims(m.group(2)) for m in map(_INSTRUCTION.match, entry) if m and m.group(3) == "parameter"}
    ops = {}
    for line in entry:
        parsed = _INSTRUCTION.match(line)
        if not parsed:
            continue
        name, shape, opcode, rest = parsed.groups()
        called = re.search(r"calls=%?([\w.\-]+)", rest)
        body = bodies.get(called.group(1), []) if called and opcode == "fusion" else [line]
        root = next((b for b in body if "ROOT" in b), line)
        source = next((s for s in map(_source, [root, line, *body]) if s), "")
        ops[name] = Op(name, _category(body, root, source, _dims(shape) in parameters), shape, source)
    return ops


def _computations(hlo_text: str) -> dict[str, list[str]]:
    """Computation name ("ENTRY" for the entry one) -> its instruction lines."""
    bodies: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in hlo_text.splitlines():
        header = _COMPUTATION.match(line)
        if header:
            current = bodies.setdefault("ENTRY" if line.startswith("ENTRY") else header.group(1), [])
        elif line.startswith("}"):
            current = None
        elif current is not None:
            current.append(line)
    return bodies


def _dims(shape: str) -> tuple[int, ...]:
    """Sorted dimensions of an HLO shape: a kernel and its transposes compare equal."""
    return tuple(sorted(int(d) for d in re.findall(r"\d+", shape.split("{")[0].split("[", 1)[-1])))


def _category(body: list[str], root: str, source: str, weight_shaped: bool) -> str:
    text = "\n".join(body)
    backward = "transpose(jvp" in source
    if " convolution(" in root:
        if weight_shaped:
            return "conv weight-gradient"
        return "conv input-gradient" if backward else "conv forward"
    if " dot(" in root:
        if not backward:
            return "dot forward"
        return "dot weight-gradient" if weight_shaped else "dot input-gradient"
    if " reduce(" in text or " reduce-window(" in text:
        return "reduction backward" if backward else "reduction forward"
    if " transpose(" in text or " copy(" in text:
        return "transpose/copy"
    return "elementwise backward" if backward else "elementwise forward"


def _source(line: str) -> str:
    found = re.search(r'op_name="([^"]*)"', line)
    return re.sub(r"^jit\([^)]*\)/", "", found.group(1)) if found else ""


def op_times(run: Callable[[], object], names: set[str]) -> Counter:
    """Nanoseconds per instruction over one call of ``run``, from a profiler trace."""
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            jax.block_until_ready(run())
        trace = next(Path(trace_dir).rglob("*.xplane.pb"))
        data = jax.profiler.ProfileData.from_file(str(trace))
    times: Counter = Counter()
    for plane in data.planes:
        for line in plane.lines:
            for event in line.events:
                if event.name in names:
                    times[event.name] += event.duration_ns
    return times


# TResNet's parts, as their names appear in the ops' source paths (first match wins). XLA fuses
# neighbouring ops, and a fusion is named after its root: the split is approximate.
COMPONENTS = {
    "space_to_depth": "space-to-depth stem",
    "blur": "anti-alias blur",
    "avg_pool_shortcut": "avg-pool shortcut",
    "/se/": "squeeze-excite",
    "/bn/": "BatchNorm",
    "/conv/": "convolutions (1x1 as dots)",
    "head/": "head",
    "leaky_relu": "activations",
    "relu": "activations",
}


def component(op: Op) -> str:
    return next((label for key, label in COMPONENTS.items() if key in op.source), "other")


def summary(ops: dict[str, Op], times: Counter, wall_s: float, top: int) -> str:
    """By category, by TResNet component, then the ``top`` slowest instructions."""
    total = sum(times.values()) or 1
    by_category: Counter = Counter()
    by_component: Counter = Counter()
    for name, ns in times.items():
        by_category[ops[name].category] += ns
        by_component[component(ops[name])] += ns
    lines = [
        f"step wall time {wall_s * 1e3:.0f} ms; ops {total / 1e6:.0f} ms (summed over threads). XLA:CPU's own "
        "convolutions and Eigen dots run on its thread pool outside the op events: their time is in the wall "
        "time only (profile with --xla-defaults to see YNNPACK's convolutions instead).",
        "",
    ]
    lines += ["| category | ms | share |", "|---|---|---|"]
    lines += [f"| {cat} | {ns / 1e6:.1f} | {ns / total:.0%} |" for cat, ns in by_category.most_common()]
    lines += ["", "| component | ms | share |", "|---|---|---|"]
    lines += [f"| {part} | {ns / 1e6:.1f} | {ns / total:.0%} |" for part, ns in by_component.most_common()]
    lines += ["", "| ms | category | output | source |", "|---|---|---|---|"]
    for name, ns in times.most_common(top):
        op = ops[name]
        lines.append(f"| {ns / 1e6:.1f} | {op.category} | {op.shape.split('{')[0]} | {op.source[-90:]} |")
    return "\n".join(lines)


def compiled_step(spec: BenchSpec, options: dict[str, str]) -> tuple[Any, tuple]:
    """(executable, arguments) of the benchmark's JAX step for ``spec``, compiled with XLA
    ``options``. Training does not donate its state here: every call gets the same one."""
    model, variables = initialised(spec.model, spec.num_classes)
    model = benchmarked(model, spec)
    images, labels = (jax.device_put(a) for a in synthetic_batch(spec))
    if spec.mode == "infer":
        step, args = jax.jit(model.apply), (variables, images)
    else:
        optimizer = optax.sgd(spec.learning_rate, momentum=0.9)
        state = TrainState(variables["params"], variables["batch_stats"], optimizer.init(variables["params"]))
        step, args = jax.jit(make_train_step(model, optimizer)), (state, images, labels)
    return step.lower(*args).compile(compiler_options=options), args


@command
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tresnet_m")
    parser.add_argument("--mode", choices=MODES, default="infer")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--top", type=int, default=25, help="slowest instructions to list")
    parser.add_argument("--xla-defaults", action="store_true", help="XLA's default options, as in the benchmark")
    args = parser.parse_args(argv)
    spec = validate(BenchSpec(args.model, args.mode, args.precision, args.batch_size, args.image_size))
    enable_compilation_cache()
    compiled, call_args = compiled_step(spec, compiler_options(args.xla_defaults))
    ops = program_ops(compiled.as_text())
    for _ in range(2):
        jax.block_until_ready(compiled(*call_args))
    start = time.perf_counter()
    jax.block_until_ready(compiled(*call_args))
    wall_s = time.perf_counter() - start
    print(summary(ops, op_times(lambda: compiled(*call_args), set(ops)), wall_s, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
