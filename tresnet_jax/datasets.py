"""Labelled image sources for evaluation and training: a folder per class, or a TFDS dataset
prepared on disk. Both hand out encoded image bytes with a label and a global index, so one
tf.data pipeline decodes and preprocesses them in parallel and every image can be traced."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tresnet_jax.classes import imagenet_index
from tresnet_jax.errors import InputError
from tresnet_jax.preprocess import tensorflow

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
DEFAULT_SPLITS = {"imagenet2012": "validation", "imagenet_v2": "test"}
IMAGENET_VAL_TARBALL = "ILSVRC2012_img_val.tar"


@dataclasses.dataclass
class FolderSource:
    """The official ``infer.py`` layout: ``root/<class>/<image>``, classes in sorted order."""

    root: Path
    class_names: list[str]
    files: list[str]
    labels: np.ndarray

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
                str(p) for p in (root / name).rglob("*")
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

    def encoded(self, start: int, end: int):
        """tf.data of (encoded bytes, label, global index) for images [start, end)."""
        tf = tensorflow()
        indices = np.arange(start, end, dtype=np.int64)
        paths = tf.data.Dataset.from_tensor_slices((self.files[start:end], self.labels[start:end], indices))
        return paths.map(tf.autograph.experimental.do_not_convert(lambda path, *rest: (tf.io.read_file(path), *rest)))

    def read_encoded(self, index: int) -> bytes:
        return Path(self.files[index]).read_bytes()

    def describe(self, index: int) -> str:
        return self.files[index]


@dataclasses.dataclass
class TfdsSource:
    """A TFDS image-classification dataset (``image`` and ``label`` features) prepared on disk."""

    builder: object
    split: str
    class_names: list[str]
    size: int

    @classmethod
    def open(cls, spec: str, data_dir: str | None = None) -> TfdsSource:
        """``spec`` is ``name[:split]`` (``imagenet2012``, ``imagenette:validation``, ...)."""
        name, _, split = spec.partition(":")
        builder = _prepared_builder(name, data_dir)
        features = builder.info.features
        if "image" not in features or "label" not in features:
            raise InputError(f"{name}: not an image-classification dataset (needs 'image' and 'label' features)")
        splits = builder.info.splits
        split = split or DEFAULT_SPLITS.get(name) or next((s for s in ("validation", "test") if s in splits), "")
        if split not in splits:
            raise InputError(f"{name}: no split {split!r}; it has {', '.join(splits)}")
        return cls(builder, split, list(features["label"].names), int(splits[split].num_examples))

    @property
    def name(self) -> str:
        return f"{self.builder.info.full_name}:{self.split}"

    def __len__(self) -> int:
        return self.size

    def encoded(self, start: int, end: int):
        import tensorflow_datasets as tfds

        tf = tensorflow()
        data = self.builder.as_dataset(
            split=f"{self.split}[{start}:{end}]", shuffle_files=False, decoders={"image": tfds.decode.SkipDecoding()}
        )
        unpack = tf.autograph.experimental.do_not_convert(
            lambda index, ex: (ex["image"], tf.cast(ex["label"], tf.int64), index)
        )
        return data.enumerate(start).map(unpack)

    def read_encoded(self, index: int) -> bytes:
        (encoded, _, _), = self.encoded(index, index + 1).as_numpy_iterator()
        return bytes(encoded)

    def describe(self, index: int) -> str:
        return f"{self.name}[{index}]"


def _prepared_builder(name: str, data_dir: str | None):
    import tensorflow_datasets as tfds

    tensorflow()
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        builder = _builder_from_files(name, data_dir)
    if not builder.is_prepared():
        raise InputError(f"dataset {name} is not prepared in {builder.data_dir}; {prepare_command(name, data_dir)}")
    return builder


def _builder_from_files(name: str, data_dir: str | None):
    """A dataset prepared by a builder that is not registered here (a user's own)."""
    import tensorflow_datasets as tfds

    root = Path(data_dir or tfds.core.constants.DATA_DIR).expanduser() / name
    infos = sorted(root.glob("**/dataset_info.json"))
    if not infos:
        raise InputError(f"dataset {name!r}: not a TFDS dataset and nothing prepared under {root}")
    return tfds.builder_from_directory(str(infos[-1].parent))


def prepare_command(name: str, data_dir: str | None) -> str:
    """The exact command that prepares a TFDS dataset where eval.py will look for it."""
    target = data_dir or "~/tensorflow_datasets"
    if name == "imagenet2012":
        return (
            f"put {IMAGENET_VAL_TARBALL} (and ILSVRC2012_img_train.tar) in {target}/downloads/manual, then run: "
            f"tfds build imagenet2012 --data_dir {target}; or pass the extracted validation images with --val_dir"
        )
    return f"prepare it with: tfds build {name} --data_dir {target}"


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
