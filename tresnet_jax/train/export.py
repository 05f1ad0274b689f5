"""The end of a run: its final weights (and their EMA) exported as weights directories
(``workdir/export``, ``workdir/export_ema``) that eval.py, predict.py and tresnet_jax.load read,
with metadata saying where and how far they were trained."""

from __future__ import annotations

from typing import Any

import jax

from tresnet_jax.data.classes import imagenet_index
from tresnet_jax.data.preprocess import Preprocessing
from tresnet_jax.runtime.parallel import host_copy
from tresnet_jax.train.parts import RunParts
from tresnet_jax.train.step import TrainState
from tresnet_jax.weights.storage import save_weights


def export_weights(parts: RunParts, state: TrainState, step: int, final: dict[str, float]) -> None:
    """Write the weights of ``state`` (trained to ``step``, validated as ``final``) and of
    their EMA, if the run keeps one; the lead process alone calls it."""
    exports = {"export": (state.params, state.batch_stats, "")}
    if state.ema_params is not None:
        exports["export_ema"] = (state.ema_params, state.ema_batch_stats, "ema_")
    for name, (params, batch_stats, prefix) in exports.items():
        variables = jax.tree_util.tree_map(host_copy, {"params": params, "batch_stats": batch_stats})
        save_weights(parts.workdir / name, variables, export_metadata(parts, step, final, prefix), force=True)
        parts.log(f"wrote {parts.workdir / name}")


def export_metadata(parts: RunParts, step: int, final: dict[str, float], prefix: str) -> dict[str, Any]:
    """The weights directory's metadata; ``prefix`` is ``ema_`` for the EMA's."""
    prep = Preprocessing(parts.cfg.image_size, squish=parts.cfg.resize == "squish")
    return {
        "model": parts.cfg.model,
        "num_classes": parts.num_classes,
        "tag": None,
        "preprocessing": {k: v for k, v in prep.to_dict().items() if k != "resize_size"},
        "reported": None,
        "source": {
            "trained_in": str(parts.workdir),
            "step": step,
            "ema": bool(prefix),
            **{k: final.get(f"{prefix}val_{k}") for k in (("mAP",) if parts.multi_label else ("top1",))},
        },
        "class_names": model_class_names(parts),
        "multi_label": parts.multi_label,
    }


def model_class_names(parts: RunParts) -> list[str] | None:
    """The model's class names: the dataset's, unless its labels are ImageNet WordNet ids
    mapped into a 1000-class model (ImageNet's names apply) or it has other counts."""
    names = [str(name) for name in parts.train_source.class_names]
    if len(names) != parts.num_classes or (parts.num_classes == 1000 and set(names) <= set(imagenet_index())):
        return None
    return names
