"""The end of a run: its final weights (and their EMA) written as weights directories
(``workdir/weights``, ``workdir/weights_ema``) that eval.py, predict.py and tresnet_jax.load
read, with a record saying where and how far they were trained."""

from __future__ import annotations

import jax

from tresnet_jax.data.classes import names_to_record
from tresnet_jax.runtime.parallel import host_copy
from tresnet_jax.train.parts import RunParts
from tresnet_jax.train.step import TrainState, constants
from tresnet_jax.weights.info import Source, WeightsInfo
from tresnet_jax.weights.storage import save_weights

WEIGHTS, EMA_WEIGHTS = "weights", "weights_ema"  # the directories in the workdir


def write_final_weights(parts: RunParts, state: TrainState, step: int, final: dict[str, float]) -> None:
    """Write the weights of ``state`` (trained to ``step``, validated as ``final``) and of
    their EMA, if the run keeps one, each with the never-trained ``constants`` (an ML-Decoder's
    queries) they compute with; the lead process alone calls it."""
    written = {WEIGHTS: (state.params, state.batch_stats, "")}
    if state.ema_params is not None:
        written[EMA_WEIGHTS] = (state.ema_params, state.ema_batch_stats, "ema_")
    for name, (params, batch_stats, prefix) in written.items():
        tree = {"params": params, "batch_stats": batch_stats, **constants(state)}
        variables = jax.tree_util.tree_map(host_copy, tree)
        save_weights(parts.workdir / name, variables, trained_info(parts, step, final, prefix), force=True)
        parts.log(f"wrote {parts.workdir / name}")


def trained_info(parts: RunParts, step: int, final: dict[str, float], prefix: str) -> WeightsInfo:
    """What the run's weights are; ``prefix`` is ``ema_`` for the EMA's."""
    cfg = parts.cfg
    validation = {k: final.get(f"{prefix}val_{k}") for k in (("mAP",) if parts.multi_label else ("top1",))}
    return WeightsInfo(
        model=cfg.model.name,
        num_classes=parts.num_classes,
        head=parts.head,
        multi_label=parts.multi_label,
        class_names=names_to_record(parts.train_source.class_names, parts.num_classes),
        preprocessing=parts.preprocessing,
        source=Source(trained_in=str(parts.workdir), step=step, ema=bool(prefix), validation=validation),
    )
