"""The training step of the NNX TResNet against the Linen one, in one process, taking turns.

    python bench/nnx_vs_linen.py                       # tresnet_m, 224, batch 8, fp32
    python bench/nnx_vs_linen.py --windows 9 --output runs/bench

Every runner does the same work on the same variables: forward in training mode, softmax
cross-entropy, backward, SGD with momentum 0.9, the BatchNorm running statistics; the state is
donated and every step is compiled ahead of time with the library's compiler options
(``tresnet_jax.xla_options``). Runners: ``linen`` (``jax.jit`` of ``bench.jax_side``'s step,
what ``bench/benchmark.py`` times), ``nnx_jit`` (``nnx.jit`` in its default graph mode),
``nnx_jit_tree`` (``nnx.jit(graph=False)``: modules as plain pytrees) and ``nnx_split_merge``
(``nnx.split`` once, ``nnx.merge`` inside ``jax.jit``). Warm-up steps are not timed; the
runners take turns window by window and each keeps its median window (``bench.timing``).
"call overhead" is the Python side of one call with the step's arguments (``call_overhead_ms``);
"XLA temp" the compiled step's temporary memory, as XLA accounts it (the same program, the same figure).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import functools
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import tresnet_jax.nnx
from bench.jax_side import TrainState, initialised, jax_runner, memory_notes, train_loop
from bench.report import device_name, environment, result_row, write_json
from bench.spec import BenchSpec, synthetic_batch, validate
from bench.timing import Runner, time_runners, timed
from tresnet_jax.cli import command
from tresnet_jax.errors import InputError
from tresnet_jax.runtime.xla_options import compiler_options

NNX_WAYS = ("nnx_jit", "nnx_jit_tree", "nnx_split_merge")


def train_step(model: tresnet_jax.nnx.TResNet, optimizer: nnx.Optimizer, images: jax.Array, labels: jax.Array):
    """One NNX training step in place (model in training mode): the work of the Linen step."""

    def loss_fn(model: tresnet_jax.nnx.TResNet) -> jax.Array:
        return optax.softmax_cross_entropy_with_integer_labels(model(images), labels).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss


def nnx_runner(way: str, spec: BenchSpec, options: dict[str, str]) -> Runner:
    """The NNX step compiled one of ``NNX_WAYS``, on a copy of the Linen runner's variables."""
    linen_model, variables = initialised(spec.model, spec.num_classes)
    model = tresnet_jax.nnx.from_linen_variables(linen_model, jax.tree.map(jnp.copy, variables))
    model.train()
    optimizer = nnx.Optimizer(model, optax.sgd(spec.learning_rate, momentum=0.9), wrt=nnx.Param)
    images, labels = (jax.device_put(a) for a in synthetic_batch(spec))
    if way == "nnx_split_merge":
        graphdef, state = nnx.split((model, optimizer))

        def pure_step(state: Any, images: jax.Array, labels: jax.Array) -> tuple[Any, jax.Array]:
            model, optimizer = nnx.merge(graphdef, state)
            loss = train_step(model, optimizer, images, labels)
            return nnx.state((model, optimizer)), loss

        jit, step, args, donate, loop = jax.jit, pure_step, (state, images, labels), (0,), train_loop
    else:
        jit = functools.partial(nnx.jit, graph=way == "nnx_jit")
        step, args, donate, loop = train_step, (model, optimizer, images, labels), (0, 1), _in_place_loop
    overhead_ms = call_overhead_ms(jit, args)
    start = time.perf_counter()
    lowered, lower_s = timed(lambda: jit(step, donate_argnums=donate).lower(*args))
    compiled, compile_s = timed(lambda: lowered.compile(compiler_options=options))
    run = loop(compiled, *args)
    run(1)
    notes = {"trace_lower_s": lower_s, "compiler_options": options, "call_overhead_ms": overhead_ms}
    notes |= memory_notes(compiled)
    return Runner(way, "jax", run, time.perf_counter() - start, compile_s, notes=notes)


def call_overhead_ms(jit: Callable, args: tuple, calls: int = 20) -> float:
    """Milliseconds per call of a function compiled by ``jit`` that takes a step's arguments
    (every buffer passed: ``keep_unused``) and computes nothing: the Python side of a step,
    which the step times include where the device cannot overlap it."""
    nothing = jit(lambda *args: jnp.zeros(()), keep_unused=True)
    nothing(*args).block_until_ready()
    start = time.perf_counter()
    out = [nothing(*args) for _ in range(calls)]
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / calls * 1e3


def linen_call_overhead_ms(spec: BenchSpec) -> float:
    """``call_overhead_ms`` of the Linen step's arguments (``bench.jax_side.TrainState``)."""
    _, variables = initialised(spec.model, spec.num_classes)
    params = variables["params"]
    state = TrainState(params, variables["batch_stats"], optax.sgd(spec.learning_rate, momentum=0.9).init(params))
    return call_overhead_ms(jax.jit, (state, *(jax.device_put(a) for a in synthetic_batch(spec))))


def _in_place_loop(compiled: Callable, *args: Any) -> Callable[[int], None]:
    """Steps of a compiled ``nnx.jit`` step, which updates model and optimizer in place."""

    def run(steps: int) -> None:
        loss = None
        for _ in range(steps):
            loss = compiled(*args)
        jax.block_until_ready((nnx.state(args[0]), loss))

    return run


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tresnet_m")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--ways", default=",".join(NNX_WAYS), help=f"comma-separated, of: {', '.join(NNX_WAYS)}")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per runner")
    parser.add_argument("--windows", type=int, default=7, help="timed windows per runner (the median is kept)")
    parser.add_argument("--steps", type=int, default=1, help="steps per window")
    parser.add_argument("--output", type=Path, help="directory for a JSON record of every window")
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> tuple[BenchSpec, list[str]]:
    spec = validate(BenchSpec(args.model, "train", "fp32", args.batch_size, args.image_size))
    ways = [w for w in args.ways.split(",") if w]
    unknown = [w for w in ways if w not in NNX_WAYS]
    if not ways or unknown:
        raise InputError(f"unknown way {(unknown or [''])[0]!r}; known: {', '.join(NNX_WAYS)}")
    if args.warmup < 0 or args.windows < 1 or args.steps < 1:
        raise InputError("--warmup must be >= 0, --windows and --steps >= 1")
    return spec, ways


def table(rows: list[dict[str, Any]]) -> str:
    """The rows as the Markdown table BENCHMARKS.md shows."""
    lines = [
        "| runner | s/step (median) | images/s | step time ÷ linen | window spread | call overhead (ms) "
        "| XLA temp (MB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = (
            r["runner"], f"{r['step_ms'] / 1e3:.3f}", f"{r['images_per_s']:.2f}", f"{r['step_time_vs_linen']:.3f}",
            f"{r['spread']:.0%}", f"{r['call_overhead_ms']:.1f}", f"{r.get('xla_temp_bytes', 0) / 1e6:.0f}",
        )  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


@command
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    spec, ways = check_args(args)
    options = compiler_options()
    runners = [jax_runner(spec, options, name="linen")] + [nnx_runner(way, spec, options) for way in ways]
    runners[0].notes["call_overhead_ms"] = linen_call_overhead_ms(spec)
    timings, other_load = time_runners(runners, args.warmup, args.windows, args.steps)
    rows = [{**result_row(spec, r, timings[r.name]), "other_load_cores": other_load} for r in runners]
    for row in rows:
        row["step_time_vs_linen"] = row["step_ms"] / rows[0]["step_ms"]
    env = environment("none", 0, None)
    print(f"{spec.model}, {spec.image_size} px, batch {spec.batch_size}, fp32 training step on {device_name(env)}; "
          f"other load {'?' if other_load is None else f'{other_load:.2f}'} cores")  # fmt: skip
    print(table(rows))
    if args.output:
        name = f"nnx_vs_linen_{spec.model}_{spec.image_size}px_b{spec.batch_size}.json"
        print(f"wrote {write_json(args.output / name, {'environment': env, 'rows': rows})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
