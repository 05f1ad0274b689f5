"""``tresnet_jax.jit``: ``jax.jit`` with the compiler options the library's own steps use.

On the CPU, XLA hands float32 convolutions to YNNPACK by default, which runs TResNet slower
than XLA's own convolutions (``xla_options``). Compiler options are per compiled function, so a
plain ``jax.jit(model.apply)`` in a notebook misses them: this wrapper adds them (on other
backends it is ``jax.jit``). Precision needs nothing here: the model carries its own
(``TResNet.allow_tf32``), so ``jax.jit`` and this give the same numbers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from tresnet_jax.runtime.xla_options import compiler_options


def jit(fun: Callable[..., Any], **kwargs: Any) -> Any:
    """``jax.jit(fun, **kwargs)`` compiled with the library's options; options passed in
    ``compiler_options`` are added to them (and win)."""
    options = {**compiler_options(), **(kwargs.pop("compiler_options", None) or {})}
    return jax.jit(fun, compiler_options=options or None, **kwargs)
