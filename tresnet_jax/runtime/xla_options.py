"""How the library's compiled steps are compiled: XLA options, what a model built for a backend
is told (1x1 convolutions as matrix products), and deterministic GPU kernels.

XLA:CPU hands float32 convolutions to YNNPACK by default. On the CPUs measured for
BENCHMARKS.md, XLA's own convolutions run TResNet 1.2-1.4x faster (inference and above all
the training step), so on the CPU backend YNNPACK is kept for matrix products and reductions
only. Other backends compile with XLA's defaults. ``TRESNET_JAX_XLA_DEFAULTS=1`` turns the
option off (for a JAX whose XLA no longer knows it, or to compare).

Precision is not set here: it is the model's own (``TResNet.allow_tf32``, ``layers.Numerics.of``),
and a float32 model runs its convolutions and matrix products in true float32 wherever it is
called from; the command lines' ``--tf32`` builds their models with ``allow_tf32``.
"""

from __future__ import annotations

import os

import jax

CPU_COMPILER_OPTIONS = {
    "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"
}
DEFAULTS_VARIABLE = "TRESNET_JAX_XLA_DEFAULTS"
# Deterministic GPU kernels (no atomics in reductions and scatters, no autotuned algorithm
# choice): the same program gives the same bits in every process. Ignored by other backends.
DETERMINISTIC_GPU_FLAG = "--xla_gpu_deterministic_ops=true"


def compiler_options(xla_defaults: bool = False) -> dict[str, str]:
    """Options for ``jax.jit(..., compiler_options=...)`` or ``Lowered.compile``: the CPU
    options on the CPU backend, none elsewhere, none when asked for XLA's defaults."""
    if xla_defaults or _enabled(DEFAULTS_VARIABLE) or jax.default_backend() != "cpu":
        return {}
    return dict(CPU_COMPILER_OPTIONS)


def pointwise_as_matmul_for(backend: str | None = None) -> bool:
    """The ``pointwise_as_matmul`` of a model built to train on ``backend`` (default: JAX's
    default backend): True on the CPU, where a 1x1 convolution's weight gradient is faster as a
    matrix product (``layers.conv2d``, BENCHMARKS.md); inference runs as fast either way."""
    return (backend or jax.default_backend()) == "cpu"


def request_deterministic_gpu_ops() -> None:
    """Ask XLA for deterministic GPU kernels (``DETERMINISTIC_GPU_FLAG``), slower but the same
    bits in every process. XLA reads the flags once, when JAX starts its backend: call this
    before anything touches a device."""
    flags = os.environ.get("XLA_FLAGS", "").split()
    if DETERMINISTIC_GPU_FLAG not in flags:
        os.environ["XLA_FLAGS"] = " ".join([*flags, DETERMINISTIC_GPU_FLAG])


def _enabled(variable: str) -> bool:
    return os.environ.get(variable, "") not in ("", "0")
