"""Labelled image sources for evaluation and training: a folder per class, or a TFDS dataset
prepared on disk (read without TensorFlow, ``data.tfds_reader``). Both are random
access: index i is the i-th image of the split in its own order (sorted files; TFDS's split
order), the one numbering of batches, logits rows, skip reports and resumed training streams.

A source has ``name``, ``class_names``, ``multi_label``, ``len()``, ``record(i) -> (encoded
bytes, label)`` and ``describe(i)`` (how a message names image i). A label is a class index of
``class_names`` (``int``) for a single-label source, a tuple of them (possibly empty) for a
multi-label one; ``label_rows`` turns a batch of either into the model's targets.
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
    multi_label = False

    @property
    def name(self) -> str:
        return f"synthetic data ({self.size} random images)"

    @property
    def class_names(self) -> list[str]:
        return [str(i) for i in range(self.num_classes)]

    def __len__(self) -> int:
        return self.size

    def batch(self, rows: int, image_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """(uint8 images, labels) of ``rows`` random examples."""
        rng = np.random.default_rng(seed)
        images = rng.integers(0, 256, (rows, image_size, image_size, 3), dtype=np.uint8)
        return images, rng.integers(0, self.num_classes, rows)

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


def model_labels(class_names: Sequence[str], num_classes: int, source: str) -> np.ndarray:
    """dataset label -> model class index.

    A 1000-class model and classes named by ImageNet WordNet ids (a validation folder, or a
    subset such as Imagenette) map through the ids; otherwise the class counts must agree.
    """
    wnids = imagenet_index()
    if num_classes == len(wnids) and all(name in wnids for name in class_names):
        return np.asarray([wnids[name] for name in class_names], np.int64)
    if len(class_names) == num_classes:
        return np.arange(num_classes, dtype=np.int64)
    raise InputError(
        f"the model has {num_classes} classes but {source} has {len(class_names)} "
        f"({', '.join(list(class_names)[:3])}, ...): these weights do not fit this dataset"
    )
