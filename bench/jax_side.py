"""The JAX side: the jitted inference function and the jitted, state-donating training step."""

from __future__ import annotations

import collections
import functools
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

import tresnet_jax
from bench.spec import BenchSpec, synthetic_batch
from bench.timing import Runner, timed
from tresnet_jax.runtime.precision import PRECISIONS
from tresnet_jax.runtime.xla_options import pointwise_as_matmul_for

# float16 gradients underflow without scaling; a fixed scale is enough to time the step
# (a trainer adjusts it dynamically).
FP16_LOSS_SCALE = 1024.0
# JAX's persistent compilation cache reports each hit and each entry it writes: whether a
# compilation was cold or read back, without guessing from its duration.
CACHE_EVENTS = {"/jax/compilation_cache/cache_hits": "hits", "/jax/compilation_cache/cache_misses": "writes"}
_cache_counts: collections.Counter[str] = collections.Counter()


def _count_cache_event(event: str, **_: object) -> None:
    if event in CACHE_EVENTS:
        _cache_counts[CACHE_EVENTS[event]] += 1


jax.monitoring.register_event_listener(_count_cache_event)


class TrainState(NamedTuple):
    params: Any
    batch_stats: Any
    opt_state: Any


def make_train_step(model: tresnet_jax.TResNet, optimizer: optax.GradientTransformation, loss_scale: float = 1.0):
    """(state, images, labels) -> (state, loss): softmax cross-entropy, gradients, optimizer
    update and BatchNorm running statistics, the same work as the timm side's step."""

    def loss_fn(params, batch_stats, images, labels):
        logits, updates = model.apply(
            {"params": params, "batch_stats": batch_stats}, images, train=True, mutable=["batch_stats"]
        )
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return loss * loss_scale, (loss, updates["batch_stats"])

    def train_step(state: TrainState, images: jax.Array, labels: jax.Array) -> tuple[TrainState, jax.Array]:
        grads, (loss, batch_stats) = jax.grad(loss_fn, has_aux=True)(state.params, state.batch_stats, images, labels)
        if loss_scale != 1.0:
            grads = jax.tree.map(lambda g: g / loss_scale, grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        return TrainState(optax.apply_updates(state.params, updates), batch_stats, opt_state), loss

    return train_step


def jax_runner(spec: BenchSpec, options: dict[str, str] | None = None, name: str = "jax") -> Runner:
    """The JAX model for ``spec``, compiled ahead of time with XLA ``options`` and run once.
    ``first_call_s`` counts tracing, compilation and the first step; initialising the
    variables is not counted."""
    model, variables = initialised(spec.model, spec.num_classes)
    model = benchmarked(model, spec)
    images, labels = (jax.device_put(a) for a in synthetic_batch(spec))
    options = options or {}
    start = time.perf_counter()
    if spec.mode == "infer":
        step, args = jax.jit(model.apply), (variables, images)
    else:
        step, state = _train_step(model, variables, spec)
        args = (state, images, labels)
    lowered, lower_s = timed(lambda: step.lower(*args))
    before = _cache_counts.copy()
    compiled, compile_s = timed(lambda: lowered.compile(compiler_options=options))
    cache = {name: _cache_counts[name] - before[name] for name in CACHE_EVENTS.values()}
    run = train_loop(compiled, *args) if spec.mode == "train" else _infer_loop(compiled, *args)
    run(1)
    notes = {
        "trace_lower_s": lower_s, "compiler_options": options, "compilation_cache": cache,
        **memory_notes(compiled), **cost_notes(compiled),
    }  # fmt: skip
    return Runner(name, "jax", run, time.perf_counter() - start, compile_s, _device_peak_memory, notes)


@functools.lru_cache(maxsize=1)
def initialised(name: str, num_classes: int) -> tuple[tresnet_jax.TResNet, Any]:
    """A fresh model, initialised once per process: a sweep and the side-by-side runners use the
    same variables at every batch size."""
    return tuple(tresnet_jax.create_model(name, num_classes=num_classes))


def benchmarked(model: tresnet_jax.TResNet, spec: BenchSpec) -> tresnet_jax.TResNet:
    """The model as ``spec`` runs it: in its precision, float32 with TF32 allowed as timm's
    convolutions are by default (cuDNN's ``allow_tf32``), 1x1 convolutions written as train.py
    writes them on this backend."""
    return model.clone(dtype=PRECISIONS[spec.precision], allow_tf32=True, pointwise_as_matmul=pointwise_as_matmul_for())


def _train_step(model: tresnet_jax.TResNet, variables: Any, spec: BenchSpec) -> tuple[Any, TrainState]:
    """The jitted training step, donating its state, and a fresh state for it (copies: the
    cached variables must survive the donation)."""
    optimizer = optax.sgd(spec.learning_rate, momentum=0.9)
    params, batch_stats = jax.tree.map(jnp.copy, (variables["params"], variables["batch_stats"]))
    loss_scale = FP16_LOSS_SCALE if spec.precision == "fp16" else 1.0
    step = jax.jit(make_train_step(model, optimizer, loss_scale), donate_argnums=0)
    return step, TrainState(params, batch_stats, optimizer.init(params))


def _infer_loop(compiled: Any, variables: Any, images: jax.Array) -> Callable[[int], None]:
    def run(steps: int) -> None:
        jax.block_until_ready([compiled(variables, images) for _ in range(steps)])

    return run


def train_loop(compiled: Any, state: TrainState, images: jax.Array, labels: jax.Array) -> Callable[[int], None]:
    """Each step's new state feeds the next (the old one's buffers were donated to it)."""
    holder = [state]

    def run(steps: int) -> None:
        loss = None
        for _ in range(steps):
            holder[0], loss = compiled(holder[0], images, labels)
        jax.block_until_ready((holder[0], loss))

    return run


def _device_peak_memory() -> int | None:
    """Peak bytes the device allocator has handed out in this process (GPU/TPU; None on CPU)."""
    stats = jax.local_devices()[0].memory_stats()
    return None if not stats else stats.get("peak_bytes_in_use")


def cost_notes(compiled: Any) -> dict[str, float]:
    """XLA's count of the floating-point operations of one call of the executable."""
    try:
        analysis = compiled.cost_analysis()
    except (NotImplementedError, jax.errors.JaxRuntimeError):
        return {}
    if isinstance(analysis, list):  # one entry per program in older JAX versions
        analysis = analysis[0] if analysis else None
    flops = (analysis or {}).get("flops")
    return {} if flops is None else {"xla_flops": float(flops)}


def memory_notes(compiled: Any) -> dict[str, int]:
    """XLA's own account of the executable's memory: its temporaries and its arguments."""
    try:
        analysis = compiled.memory_analysis()
    except (NotImplementedError, jax.errors.JaxRuntimeError):
        return {}
    if analysis is None:
        return {}
    return {
        "xla_temp_bytes": int(analysis.temp_size_in_bytes),
        "xla_argument_bytes": int(analysis.argument_size_in_bytes),
    }
