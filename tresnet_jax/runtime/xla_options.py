"""How the library's compiled steps are compiled: XLA options, matrix-product precision, and
deterministic GPU kernels.

XLA:CPU hands float32 convolutions to YNNPACK by default. On the CPUs measured for
BENCHMARKS.md, XLA's own convolutions run TResNet 1.2-1.4x faster (inference and above all
the training step), so on the CPU backend YNNPACK is kept for matrix products and reductions
only. Other backends compile with XLA's defaults. ``TRESNET_JAX_XLA_DEFAULTS=1`` turns the
option off (for a JAX whose XLA no longer knows it, or to compare).

Precision, the one rule: a float32 model's convolutions and matrix products run in true
float32 (``jax_default_matmul_precision`` "highest"), because float32 is what the parity with
timm is promised for. JAX's default would use TF32 on NVIDIA GPUs since Ampere (10 mantissa
bits instead of 23) and bfloat16 passes on TPUs. ``TRESNET_JAX_TF32=1`` opts
into JAX's default for float32 (faster on a GPU). bfloat16 and float16 models are not affected.
On the CPU the compiled program is the same either way.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import jax
import jax.numpy as jnp

CPU_COMPILER_OPTIONS = {
    "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"
}
DEFAULTS_VARIABLE = "TRESNET_JAX_XLA_DEFAULTS"
TF32_VARIABLE = "TRESNET_JAX_TF32"
# Deterministic GPU kernels (no atomics in reductions and scatters, no autotuned algorithm
# choice): the same program gives the same bits in every process. Ignored by other backends.
DETERMINISTIC_GPU_FLAG = "--xla_gpu_deterministic_ops=true"


def compiler_options(xla_defaults: bool = False) -> dict[str, str]:
    """Options for ``jax.jit(..., compiler_options=...)`` or ``Lowered.compile``: the CPU
    options on the CPU backend, none elsewhere, none when asked for XLA's defaults."""
    if xla_defaults or _enabled(DEFAULTS_VARIABLE) or jax.default_backend() != "cpu":
        return {}
    return dict(CPU_COMPILER_OPTIONS)


def matmul_precision(dtype: Any) -> str | None:
    """The ``jax_default_matmul_precision`` for a model computing in ``dtype``: "highest" for
    float32 unless ``$TRESNET_JAX_TF32`` is set, else None (JAX's default)."""
    if jnp.dtype(dtype) != jnp.float32 or _enabled(TF32_VARIABLE):
        return None
    return "highest"


def precision_scope(dtype: Any) -> contextlib.AbstractContextManager:
    """Trace a model computing in ``dtype`` inside this (``matmul_precision``)."""
    return jax.default_matmul_precision(matmul_precision(dtype))


def request_deterministic_gpu_ops() -> None:
    """Ask XLA for deterministic GPU kernels (``DETERMINISTIC_GPU_FLAG``), slower but the same
    bits in every process. XLA reads the flags once, when JAX starts its backend: call this
    before anything touches a device."""
    flags = os.environ.get("XLA_FLAGS", "").split()
    if DETERMINISTIC_GPU_FLAG not in flags:
        os.environ["XLA_FLAGS"] = " ".join([*flags, DETERMINISTIC_GPU_FLAG])


def _enabled(variable: str) -> bool:
    return os.environ.get(variable, "") not in ("", "0")
