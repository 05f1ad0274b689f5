"""Labelled image sources for evaluation and training: a folder per class, a labels CSV
(``data.labels_csv``), a TFDS dataset prepared on disk (read without TensorFlow,
``data.tfds_reader``) or random images. All are random access: index i is the i-th image of
the split in its own order (sorted files; the CSV's rows; TFDS's split order), the one
numbering of batches, logits rows, skip reports and resumed training streams.

A source has ``name``, ``class_names``, ``multi_label``, ``len()``, ``record(i) -> (encoded
bytes, label)`` and ``describe(i)`` (how a message names image i). A label is a class index of
``class_names`` (``int``) for a single-label source, a tuple of them (possibly empty) for a
multi-label one; ``LabelMap.rows`` turns a batch of either into the model's targets. Every
stream reads every source through ``record`` alone (``data.pipeline``).
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
SYNTHETIC_SIDE = 64  # pixels of a synthetic image, resized to the model's input like any image


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
    """Random images made from their index (``--synthetic-data``), read as any source's: small
    uncompressed images (binary PPM), nothing read from disk and next to nothing to decode, so
    that the compiled steps' speed can be told apart from the input's. Not JPEGs: the GPU
    decoder leaves them to the host's path."""

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

    def record(self, index: int) -> tuple[bytes, Label]:
        rng = np.random.default_rng(index)
        pixels = rng.integers(0, 256, (SYNTHETIC_SIDE, SYNTHETIC_SIDE, 3), dtype=np.uint8)
        encoded = b"P6 %d %d 255\n" % (SYNTHETIC_SIDE, SYNTHETIC_SIDE) + pixels.tobytes()
        if not self.multi_label:
            return encoded, int(rng.integers(self.num_classes))
        present = rng.integers(0, self.num_classes, rng.integers(1, 4))
        return encoded, tuple(sorted(set(present.tolist())))

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


def model_labels(source: Source, num_classes: int, model_class_names: Sequence[str] | None = None) -> LabelMap:
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
