"""The names of compute precisions, one vocabulary for every tool: ``fp32``, ``bf16``, ``fp16``
(the spellings ``float32``, ``bfloat16``, ``float16`` are accepted too), their dtypes, and
the default where "auto" is asked for: bfloat16 on a GPU or TPU, float32 on the CPU."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from tresnet_jax.errors import InputError

PRECISIONS: dict[str, Any] = {"fp32": jnp.float32, "bf16": jnp.bfloat16, "fp16": jnp.float16}
ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
CHOICES = (*PRECISIONS, "auto")


def canonical(name: str) -> str:
    """``name`` in the one vocabulary (``bfloat16`` -> ``bf16``); ``auto`` stays."""
    return ALIASES.get(name, name)


def default_precision(backend: str | None = None) -> str:
    """What "auto" means on ``backend`` (default: JAX's): bf16 on a GPU or TPU, else fp32."""
    return "bf16" if (backend or jax.default_backend()) in ("gpu", "tpu") else "fp32"


def compute_dtype(name: str) -> Any:
    """The dtype of a precision name (either spelling, or ``auto``); InputError naming the choices."""
    name = canonical(name)
    if name == "auto":
        name = default_precision()
    if name not in PRECISIONS:
        raise InputError(f"unknown precision {name!r}; known: {', '.join(CHOICES)} (or {', '.join(ALIASES)})")
    return PRECISIONS[name]
