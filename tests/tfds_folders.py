"""Image folders turned into a TFDS dataset prepared on disk, for tests of the TFDS paths."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image, UnidentifiedImageError

from tresnet_jax.data.sources import FolderSource


def prepare_from_folders(
    class_name: str, data_dir: Path, splits: dict[str, Path], num_shards: int | None = None
) -> str:
    """Prepare a dataset whose splits are the given class folders (unreadable files are left
    out) in ``data_dir``, with a builder that is not registered: what eval.py and train.py find
    there is only what is on disk; ``num_shards`` files per split (TFDS's choice by default).
    Returns the dataset's name (``class_name`` in snake case)."""
    sources = {split: FolderSource.scan(folder) for split, folder in splits.items()}
    class_names = next(iter(sources.values())).class_names

    def info(self):
        features = {"image": tfds.features.Image(), "label": tfds.features.ClassLabel(names=class_names)}
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

    def split_generators(self, dl_manager):
        return {split: examples(source) for split, source in sources.items()}

    def examples(source):
        for i, (path, label) in enumerate(zip(source.files, source.labels, strict=True)):
            try:
                image = np.asarray(Image.open(path).convert("RGB"))
            except (OSError, UnidentifiedImageError):
                continue
            yield i, {"image": image, "label": int(label)}

    namespace = {
        "VERSION": tfds.core.Version("1.0.0"),
        "_info": info,
        "_split_generators": split_generators,
        "_generate_examples": None,
    }
    builder = type(class_name, (tfds.core.GeneratorBasedBuilder,), namespace, skip_registration=True)
    prepared = builder(data_dir=str(data_dir))
    prepared.download_and_prepare(download_config=tfds.download.DownloadConfig(num_shards=num_shards))
    return prepared.name


def corrupt_record(shard: Path, encoded: bytes) -> None:
    """Overwrite the middle of one record's encoded image in a shard file (same length, so the
    file's framing stays intact and only that image fails to decode)."""
    data = bytearray(shard.read_bytes())
    start = data.find(encoded)
    assert start >= 0, "the image is not in the shard"
    assert data.find(encoded, start + 1) < 0, "the image must occur once in the shard"
    middle = start + len(encoded) // 4
    data[middle : middle + len(encoded) // 2] = bytes(len(encoded) // 2)
    shard.write_bytes(bytes(data))
