"""Multi-label losses: the asymmetric loss of ASL (Ridnik et al., 2021, arXiv:2009.14119), which
the multi-label TResNets were trained with, and plain binary cross-entropy as its special case.

Both take logits and multi-hot targets of shape (batch, classes) and return one float32 scalar
(float64 under x64 with float64 logits): the loss summed over the classes and averaged over the
batch.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def asymmetric_loss(
    logits: jax.Array,
    targets: jax.Array,
    gamma_neg: float = 4.0,
    gamma_pos: float = 0.0,
    clip: float | None = 0.05,
    eps: float = 1e-8,
) -> jax.Array:
    """ASL: binary cross-entropy per class with separate focusing for positives and negatives,
    and the negatives' probability shifted down by ``clip``.

    With ``p = sigmoid(logits)`` and ``p_m = max(p - clip, 0)`` (``p_m = p`` when ``clip`` is 0
    or None), each element contributes::

        -[y * log(max(p, eps)) + (1 - y) * log(max(1 - p_m, eps))] * w,
        w = (1 - pt)**(gamma_pos * y + gamma_neg * (1 - y)),  1 - pt = y * (1 - p) + (1 - y) * p_m

    For 0/1 targets that is ASL's ``-log(p) * (1 - p)**gamma_pos`` for positives and
    ``-log(1 - p_m) * p_m**gamma_neg`` for negatives. Soft targets in [0, 1] (label smoothing,
    mixup) follow ASL's code and timm's: one focusing weight per element, whose base mixes the
    two probabilities and whose exponent interpolates between the gammas, as above.

    Reduction: the sum over classes, averaged over the batch (timm's ``batchmean``, the default
    of its current ``AsymmetricLossMultiLabel``; the official ASL code returns the batch sum).
    The mean over the batch keeps the gradient's scale, and so the learning rate, independent of
    the batch size and of the number of devices, and matches the single-label training step,
    which averages its cross-entropy over the batch; ASL's sum equals this times the batch size.

    The gradient flows through the focusing weight too, as in timm by default
    (``disable_torch_grad_focal_loss=False``).

    The maths is float32 whatever the logits' dtype (bf16 and fp16 are upcast; float64 stays).
    ``1 - p`` is ``sigmoid(-logits)``, the logs are log-sigmoids, clamped at ``log(eps)``, and
    ``1 - pt`` is summed as above rather than subtracted from 1: the same values as the
    definition without its cancellation near ``p = 1``. The weight is ``exp(e * log(1 - pt))``
    where ``1 - pt`` is a normal float, and ``0**e`` (1 for ``e = 0``, else 0) below that, with
    no gradient there: the derivative of ``b**e`` is infinite at ``b = 0`` for ``e < 1`` (NaN in
    JAX for ``e = 0``), and ``1 - pt`` reaches 0 for clipped negatives (``p <= clip``) and for
    saturated logits. The loss terms that weight multiplies are then 0 or nearly so (``log(1)``,
    or ``log(p)`` with ``1 - p`` below ``1e-38``), so the value is unchanged. ``gamma_neg``,
    ``gamma_pos``, ``clip`` and ``eps`` are Python numbers (static under ``jax.jit``); with both
    gammas 0 the weight is dropped altogether.
    """
    logits = jnp.asarray(logits)
    targets = jnp.asarray(targets)
    if logits.ndim != 2 or logits.shape != targets.shape:
        raise ValueError(
            f"asymmetric_loss: logits and targets must both be (batch, classes); got {logits.shape} and {targets.shape}"
        )
    dtype = jnp.promote_types(logits.dtype, jnp.float32)
    x = logits.astype(dtype)
    y = targets.astype(dtype)
    log_eps = math.log(eps)

    log_p = jnp.maximum(jax.nn.log_sigmoid(x), log_eps)
    if clip is not None and clip > 0:
        p_m = jnp.maximum(jax.nn.sigmoid(x) - clip, 0.0)
        log_not_p_m = jnp.log(jnp.maximum(jnp.minimum(jax.nn.sigmoid(-x) + clip, 1.0), eps))
    else:
        p_m = jax.nn.sigmoid(x)
        log_not_p_m = jnp.maximum(jax.nn.log_sigmoid(-x), log_eps)

    loss = y * log_p + (1.0 - y) * log_not_p_m
    if gamma_neg or gamma_pos:
        base = y * jax.nn.sigmoid(-x) + (1.0 - y) * p_m  # 1 - pt
        exponent = gamma_pos * y + gamma_neg * (1.0 - y)
        normal = base >= jnp.finfo(dtype).tiny
        safe = jnp.where(normal, base, 1.0)  # no log(0), and no 1/base overflow, in the gradient
        weight = jnp.where(normal, jnp.exp(exponent * jnp.log(safe)), jnp.where(exponent == 0, 1.0, 0.0))
        loss = loss * weight
    return -jnp.sum(loss) / x.shape[0]


def binary_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Sigmoid binary cross-entropy, summed over the classes and averaged over the batch: the
    asymmetric loss without focusing or clipping (probabilities clamped at 1e-8, like it)."""
    return asymmetric_loss(logits, targets, gamma_neg=0.0, gamma_pos=0.0, clip=None)
