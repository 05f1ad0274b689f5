"""Validation during and at the end of a run: top-1, top-5 and loss (multi-label: mAP and loss)
of the weights (and of their EMA) on the validation set, logged as a metrics row and a line."""

from __future__ import annotations

from tresnet_jax.data.sources import model_labels
from tresnet_jax.evaluation import evaluate_many
from tresnet_jax.train.parts import RunParts
from tresnet_jax.train.run_log import MetricsLog
from tresnet_jax.train.step import TrainState, constants


def validate(parts: RunParts, state: TrainState, step: int, metrics_log: MetricsLog) -> dict[str, float]:
    """The metrics row of ``state`` at ``step`` on the validation set (``ema_``-prefixed for the
    EMA): top-1, top-5 and loss, or for multi-label data mAP and loss; empty when the run has no
    validation set."""
    if parts.val_source is None:
        return {}
    cfg = parts.cfg
    labels = model_labels(parts.val_source, parts.num_classes, parts.train_source.class_names)
    batch = cfg.run.eval_batch_size or cfg.optim.batch_size
    weights = {"": {"params": state.params, "batch_stats": state.batch_stats, **constants(state)}}
    if state.ema_params is not None:
        weights["ema_"] = {"params": state.ema_params, "batch_stats": state.ema_batch_stats, **constants(state)}
    results = evaluate_many(
        parts.eval_model,
        weights,
        parts.val_source,
        parts.preprocessing,
        labels,
        batch,
        parts.mesh,
        decoder=parts.decoder,
    )
    names = ("mAP", "loss") if parts.multi_label else ("top1", "top5", "loss")
    row = {f"{prefix}val_{k}": result.metrics()[k] for prefix, result in results.items() for k in names}
    epoch = step / parts.steps_per_epoch
    metrics_log.write({"step": step, "epoch": epoch, **row})
    key, title = ("mAP", "mAP") if parts.multi_label else ("top1", "top-1")
    ema = f" (EMA {row[f'ema_val_{key}']:.2f})" if f"ema_val_{key}" in row else ""
    parts.log(f"epoch {epoch:g}: validation {title} {row[f'val_{key}']:.2f}{ema}")
    return row
