"""ImageNet-1k class names, shipped with the package: index = position in the sorted WordNet
ids, as in an ImageFolder of the validation set."""

from __future__ import annotations

import functools
from importlib import resources


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
