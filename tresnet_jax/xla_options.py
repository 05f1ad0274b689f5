"""XLA compiler options the library's compiled steps use.

XLA:CPU hands float32 convolutions to YNNPACK by default. On the CPUs measured for
BENCHMARKS.md, XLA's own convolutions run TResNet 1.2-1.4x faster (inference and above all
the training step), so on the CPU backend YNNPACK is kept for matrix products and reductions
only. Other backends compile with XLA's defaults. ``TRESNET_JAX_XLA_DEFAULTS=1`` turns the
option off (for a JAX whose XLA no longer knows it, or to compare).
"""

from __future__ import annotations

import os

import jax

CPU_COMPILER_OPTIONS = {
    "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"
}
DEFAULTS_VARIABLE = "TRESNET_JAX_XLA_DEFAULTS"


def compiler_options(xla_defaults: bool = False) -> dict[str, str]:
    """Options for ``jax.jit(..., compiler_options=...)`` or ``Lowered.compile``: the CPU
    options on the CPU backend, none elsewhere, none when asked for XLA's defaults."""
    if xla_defaults or os.environ.get(DEFAULTS_VARIABLE, "") not in ("", "0") or jax.default_backend() != "cpu":
        return {}
    return dict(CPU_COMPILER_OPTIONS)
