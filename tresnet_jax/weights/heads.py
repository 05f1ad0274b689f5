"""Weights given another number of classes or another head: the backbone kept, a new head drawn
as the original draws a fresh one, and the record saying so. The one place this happens, for
the converter (``--num-classes``), ``load``/``create_model(..., num_classes=, head=)`` and
``train.py --init``."""

from __future__ import annotations

from typing import Any

from tresnet_jax.model.architecture import HeadSpec
from tresnet_jax.model.initialization import Seed, replace_head
from tresnet_jax.weights.info import WeightsInfo

Variables = dict[str, Any]


def with_classes(
    variables: Variables, info: WeightsInfo, num_classes: int | None, seed: Seed = 0, head: HeadSpec | None = None
) -> tuple[Variables, WeightsInfo, str]:
    """``variables`` and ``info`` for a ``num_classes`` head of kind ``head`` (None: the count
    or kind they have; the same count and kind: as they are; 0 classes: no head, pooled
    features out), and a line saying what happened. A new head's weights are no longer the
    published ones: the record keeps their preprocessing and source but drops the tag,
    reported figures and class names."""
    classes = info.num_classes if num_classes is None else num_classes
    if head is None:  # the weights' kind of head; a K they state capped at the new count, as the original caps it
        head = info.head.resolved(classes) if info.head.num_groups is not None and classes else info.head
    if classes == info.num_classes and head == info.head:
        return variables, info, "its head kept"
    num_classes = classes
    head = head if num_classes else HeadSpec()
    head.check_classes(num_classes)
    if num_classes:
        kind = "" if head == info.head else f" {head.describe()}"
        note = f"replaced the {info.num_classes}-class head by a new {num_classes}-class{kind} one (seed {seed})"
        had = f"a {info.num_classes}-class {info.head.describe()} head" if kind else str(info.num_classes)
        said = f"a new {num_classes}-class{kind} head (it had {had})"
    else:
        note = f"dropped the {info.num_classes}-class head: the model outputs pooled features"
        said = f"no head (it had {info.num_classes} classes)"
    if info.class_names is not None:
        note += f"; dropped its {len(info.class_names)} class names with it"
    new = info.replace(
        num_classes=num_classes, head=head, class_names=None, tag=None, reported=None, notes=(*info.notes, note)
    )
    return replace_head(variables, info.arch, num_classes, seed, head), new, said
