"""Class names: ImageNet-1k's, shipped with the package (index = position in the sorted WordNet
ids, as in an ImageFolder of the validation set), and the one rule for the names a model's
classes are shown and recorded under."""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from importlib import resources

from tresnet_jax.errors import InputError


@functools.cache
def imagenet_classes() -> tuple[tuple[str, str], ...]:
    """(WordNet id, names) of the 1000 classes, in class-index order."""
    text = resources.files("tresnet_jax").joinpath("data/imagenet_classes.tsv").read_text()
    rows = [line.split("\t", 1) for line in text.splitlines() if line and not line.startswith("#")]
    return tuple((wnid, names) for wnid, names in rows)


@functools.cache
def imagenet_index() -> dict[str, int]:
    """WordNet id -> ImageNet-1k class index."""
    return {wnid: i for i, (wnid, _) in enumerate(imagenet_classes())}


def class_names(
    num_classes: int, own: Sequence[str] | None = None, from_data: Mapping[int, str] | None = None
) -> list[str]:
    """The names to show for a model's classes, the one rule every tool follows: the weights'
    own (``own``, when there is one a class); else the data's, by model class (``from_data``);
    else ImageNet's for a 1000-class model ("tench (n01440764)"); else "class i"."""
    if own is not None and len(own) == num_classes:
        return [str(name) for name in own]
    if num_classes == len(imagenet_classes()) and not from_data:
        return [f"{names.split(',')[0]} ({wnid})" for wnid, names in imagenet_classes()]
    return [str((from_data or {}).get(i, f"class {i}")) for i in range(num_classes)]


def names_to_record(data_names: Sequence[str], num_classes: int) -> list[str] | None:
    """The class names a trained model's metadata keeps: its training set's, unless they are
    ImageNet's WordNet ids in a 1000-class model (ImageNet's names apply) or their count differs."""
    names = [str(name) for name in data_names]
    if len(names) != num_classes or (num_classes == len(imagenet_classes()) and set(names) <= set(imagenet_index())):
        return None
    return names


KINDS = {True: "multi-label (several classes an image)", False: "single-label (one class an image)"}


def check_label_kind(
    source_name: str, source_multi_label: bool, multi_label: bool, model: str, remedy: Mapping[bool, str]
) -> None:
    """One line, before anything is compiled or written, when a dataset and the model disagree
    on whether an image has one class or several; ``model`` names what makes the model's kind,
    with its verb ("these weights are", "--loss asl is"), ``remedy`` what to do, by that kind."""
    if source_multi_label != multi_label:
        raise InputError(
            f"{model} {KINDS[multi_label]} but {source_name} is {KINDS[source_multi_label]}: {remedy[multi_label]}"
        )
