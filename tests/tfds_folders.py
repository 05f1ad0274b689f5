"""Image folders, and multi-label datasets laid out as TFDS's voc and coco, turned into TFDS
datasets prepared on disk, for tests of the TFDS paths."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image, UnidentifiedImageError

from tests.images import generated
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


# The features of TFDS's own builders (tensorflow_datasets/object_detection/voc.py and coco.py).
VOC_POSES = ["frontal", "rear", "left", "right", "unspecified"]
MULTI_LABEL_LAYOUTS = {  # layout: (builder class, config, version)
    "voc": ("Voc", "2007", "5.0.0"),
    "coco": ("Coco", "2017", "1.1.0"),
}


def prepare_multi_label(
    layout: str,
    data_dir: Path,
    splits: dict[str, list[list[int]]],
    class_names: list[str],
    num_shards: int | None = None,
) -> str:
    """Prepare in ``data_dir`` a multi-label dataset with the features of TFDS's ``voc/2007``
    (``layout="voc"``) or ``coco/2017`` (``"coco"``), under the same name, config and version,
    with a builder that is not registered. ``splits``: {split: the objects of each image, as
    class indices of ``class_names`` (a class may repeat, an image may have none)}; each image is
    a small generated picture of its own (PNG for voc, JPEG for coco).

    voc: 'labels' the distinct classes, 'labels_no_difficult' those of objects not difficult
    (every third object of an image is), 'objects' with label, bbox, pose, is_truncated and
    is_difficult. coco: 'image/id', 'objects' with id, area, bbox, label and is_crowd (every fourth
    object), the label a ClassLabel(num_classes=...) named while generating, as coco.py does.
    ``num_shards`` files per split (TFDS's choice by default). Returns ``NAME/CONFIG``."""
    class_name, config, version = MULTI_LABEL_LAYOUTS[layout]
    seeds = {split: 1000 * number for number, split in enumerate(splits)}

    def box(k: int) -> tfds.features.BBox:
        return tfds.features.BBox(ymin=0.1, xmin=0.05 * (k % 10), ymax=0.9, xmax=0.5 + 0.05 * (k % 10))

    def voc_features():
        return {
            "image": tfds.features.Image(),
            "image/filename": tfds.features.Text(),
            "objects": tfds.features.Sequence(
                {
                    "label": tfds.features.ClassLabel(names=class_names),
                    "bbox": tfds.features.BBoxFeature(),
                    "pose": tfds.features.ClassLabel(names=VOC_POSES),
                    "is_truncated": np.bool_,
                    "is_difficult": np.bool_,
                }
            ),
            "labels": tfds.features.Sequence(tfds.features.ClassLabel(names=class_names)),
            "labels_no_difficult": tfds.features.Sequence(tfds.features.ClassLabel(names=class_names)),
        }

    def voc_example(seed, image, classes):
        objects = [
            {
                "label": c,
                "bbox": box(k),
                "pose": k % len(VOC_POSES),
                "is_truncated": k % 2 == 1,
                "is_difficult": k % 3 == 2,
            }
            for k, c in enumerate(classes)
        ]
        return {
            "image": image,
            "image/filename": f"{seed:06d}.jpg",
            "objects": objects,
            "labels": sorted(set(classes)),
            "labels_no_difficult": sorted({o["label"] for o in objects if not o["is_difficult"]}),
        }

    def coco_features():
        return {
            "image": tfds.features.Image(encoding_format="jpeg"),
            "image/filename": tfds.features.Text(),
            "image/id": np.int64,
            "objects": tfds.features.Sequence(
                {
                    "id": np.int64,
                    "area": np.int64,
                    "bbox": tfds.features.BBoxFeature(),
                    "label": tfds.features.ClassLabel(num_classes=len(class_names)),
                    "is_crowd": np.bool_,
                }
            ),
        }

    def coco_example(seed, image, classes):
        objects = [
            {"id": seed * 100 + k, "area": 10 + k, "bbox": box(k), "label": c, "is_crowd": k % 4 == 3}
            for k, c in enumerate(classes)
        ]
        return {"image": image, "image/filename": f"{seed:012d}.jpg", "image/id": seed, "objects": objects}

    features, example = {"voc": (voc_features, voc_example), "coco": (coco_features, coco_example)}[layout]

    def info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features()))

    def split_generators(self, dl_manager):
        return {split: examples(self, split, images) for split, images in splits.items()}

    def examples(self, split, images):
        if layout == "coco":
            self.info.features["objects"]["label"].names = class_names
        for i, classes in enumerate(images):
            seed = seeds[split] + i
            yield seed, example(seed, generated(seed, 12 + i % 5, 16 + i % 3), list(classes))

    namespace = {
        "VERSION": tfds.core.Version(version),
        "BUILDER_CONFIGS": [tfds.core.BuilderConfig(name=config)],
        "_info": info,
        "_split_generators": split_generators,
        "_generate_examples": None,
    }
    builder = type(class_name, (tfds.core.GeneratorBasedBuilder,), namespace, skip_registration=True)
    prepared = builder(config=config, data_dir=str(data_dir))
    prepared.download_and_prepare(download_config=tfds.download.DownloadConfig(num_shards=num_shards))
    return f"{prepared.name}/{config}"
