"""Weights given another number of classes: the backbone kept, a new head drawn as the original
draws a fresh one, and the record saying so. The one place this happens, for the converter
(``--num-classes``), ``load``/``create_model(..., num_classes=)`` and ``train.py --init``."""

from __future__ import annotations

from typing import Any

from tresnet_jax.model.initialization import Seed, replace_head
from tresnet_jax.weights.info import WeightsInfo

Variables = dict[str, Any]


def with_classes(
    variables: Variables, info: WeightsInfo, num_classes: int | None, seed: Seed = 0
) -> tuple[Variables, WeightsInfo, str]:
    """``variables`` and ``info`` for a ``num_classes`` head (None or the same count: as they
    are; 0: no head, pooled features out), and a line saying what happened. A new head's
    weights are no longer the published ones: the record keeps their preprocessing and source
    but drops the tag, reported figures and class names."""
    if num_classes is None or num_classes == info.num_classes:
        return variables, info, "its head kept"
    if num_classes:
        note = f"replaced the {info.num_classes}-class head by a new {num_classes}-class one (seed {seed})"
        said = f"a new {num_classes}-class head (it had {info.num_classes})"
    else:
        note = f"dropped the {info.num_classes}-class head: the model outputs pooled features"
        said = f"no head (it had {info.num_classes} classes)"
    if info.class_names is not None:
        note += f"; dropped its {len(info.class_names)} class names with it"
    new = info.replace(num_classes=num_classes, class_names=None, tag=None, reported=None, notes=(*info.notes, note))
    return replace_head(variables, info.arch, num_classes, seed), new, said
