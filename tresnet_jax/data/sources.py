"""Labelled image sources for evaluation and training: a folder per class, or a TFDS dataset
prepared on disk (read without TensorFlow, ``data.tfds_reader``). Both are random
access: index i is the i-th image of the split in its own order (sorted files; TFDS's split
order), the one numbering of batches, logits rows, skip reports and resumed training streams.

A source has ``name``, ``class_names``, ``multi_label``, ``len()``, ``record(i) -> (encoded
bytes, label)`` and ``describe(i)`` (how a message names image i). A label is a class index of
``class_names`` (``int``) for a single-label source, a tuple of them (possibly empty) for a
multi-label one; ``LabelMap.rows`` turns a batch of either into the model's targets.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from tresnet_jax.data.classes import imagenet_index
from tresnet_jax.errors import InputError

Label = int | tuple[int, ...]  # one class, or the classes present (multi-label)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


@dataclasses.dataclass
class FolderSource:
    """The official ``infer.py`` layout: ``root/<class>/<image>``, classes in sorted order."""

    root: Path
    class_names: list[str]
    files: list[str]
    labels: np.ndarray
    multi_label = False

    @classmethod
    def scan(cls, root: str | os.PathLike) -> FolderSource:
        root = Path(root).expanduser()
        if not root.is_dir():
            raise InputError(f"{root}: no such directory")
        classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not classes:
            raise InputError(f"{root}: no class folders (expected {root}/<class>/<image files>)")
        files, labels = [], []
        for label, name in enumerate(classes):
            images = sorted(
                str(p)
                for p in (root / name).rglob("*")
                if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and not p.name.startswith(".")
            )
            files += images
            labels += [label] * len(images)
        if not files:
            raise InputError(f"{root}: no images in its {len(classes)} class folders ({', '.join(IMAGE_SUFFIXES)})")
        return cls(root, classes, files, np.asarray(labels, np.int64))

    @property
    def name(self) -> str:
        return str(self.root)

    def __len__(self) -> int:
        return len(self.files)

    def record(self, index: int) -> tuple[bytes, int]:
        return Path(self.files[index]).read_bytes(), int(self.labels[index])

    def describe(self, index: int) -> str:
        return self.files[index]


@dataclasses.dataclass(frozen=True)
class SyntheticSource:
    """Random images made once and reused (``--synthetic-data``): the compiled steps run
    without reading or decoding anything, so their speed can be told apart from the input's."""

    size: int
    num_classes: int = 1000
    multi_label: bool = False  # labels: 1 to 3 random classes

    @property
    def name(self) -> str:
        return f"synthetic data ({self.size} random images)"

    @property
    def class_names(self) -> list[str]:
        return [str(i) for i in range(self.num_classes)]

    def __len__(self) -> int:
        return self.size

    def batch(self, rows: int, image_size: int, seed: int) -> tuple[np.ndarray, list[Label]]:
        """(uint8 images, labels) of ``rows`` random examples."""
        rng = np.random.default_rng(seed)
        images = rng.integers(0, 256, (rows, image_size, image_size, 3), dtype=np.uint8)
        if not self.multi_label:
            return images, rng.integers(0, self.num_classes, rows).tolist()
        counts = rng.integers(1, 4, rows)
        return images, [tuple(sorted(set(rng.integers(0, self.num_classes, n).tolist()))) for n in counts]

    def describe(self, index: int) -> str:
        return f"synthetic[{index}]"


class Source(Protocol):
    """What evaluation and training read images from."""

    @property
    def name(self) -> str: ...

    class_names: list[str]
    multi_label: bool  # labels are tuples of classes present, not one class

    def __len__(self) -> int: ...

    def record(self, index: int) -> tuple[bytes, Label]: ...

    def describe(self, index: int) -> str: ...


@dataclasses.dataclass(frozen=True)
class LabelMap:
    """A source's labels -> the model's targets: a class index per image (single-label), or a
    multi-hot row of the model's classes per image (multi-label)."""

    classes: np.ndarray  # the source's class index -> the model's
    num_classes: int  # the model's
    multi_label: bool = False

    def rows(self, labels: Sequence[Label]) -> np.ndarray:
        """int32 (n,) model classes, or uint8 (n, num_classes) multi-hot rows."""
        if not self.multi_label:
            return self.classes[np.asarray(labels, np.int64).reshape(-1)].astype(np.int32)
        hot = np.zeros((len(labels), self.num_classes), np.uint8)
        for row, present in enumerate(labels):
            hot[row, self.classes[list(present)]] = 1
        return hot

    def empty(self, rows: int) -> np.ndarray:
        """``rows`` rows of padding, shaped as ``LabelMap.rows`` makes its rows."""
        return self.rows([()] * rows if self.multi_label else [0] * rows)


def model_labels(
    source: Source | SyntheticSource, num_classes: int, model_class_names: Sequence[str] | None = None
) -> LabelMap:
    """How ``source``'s labels become targets of a ``num_classes``-class model.

    Classes named as the model names its own (``model_class_names``, the weights' metadata) map by
    name; a 1000-class single-label model and classes named by ImageNet WordNet ids (a validation
    folder, or a subset such as Imagenette) map through the ids; otherwise the class counts must
    agree and class i is class i.
    """
    names = list(source.class_names)
    multi = bool(source.multi_label)
    if model_class_names is not None and len(model_class_names) == num_classes:
        index = {name: i for i, name in enumerate(model_class_names)}
        if all(name in index for name in names) and len(index) == num_classes:
            return LabelMap(np.asarray([index[name] for name in names], np.int64), num_classes, multi)
    wnids = imagenet_index()
    if not multi and num_classes == len(wnids) and all(name in wnids for name in names):
        return LabelMap(np.asarray([wnids[name] for name in names], np.int64), num_classes)
    if len(names) == num_classes:
        return LabelMap(np.arange(num_classes, dtype=np.int64), num_classes, multi)
    raise InputError(
        f"the model has {num_classes} classes but {source.name} has {len(names)} "
        f"({', '.join(names[:3])}, ...): these weights do not fit this dataset"
    )
