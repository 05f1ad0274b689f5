"""tresnet_jax.tfds_reader against datasets that TFDS itself writes: record i is what TFDS gives
for ``split[i:i+1]``, from many threads, with neither TensorFlow nor tensorflow_datasets; for
image classification and for multi-label datasets laid out as TFDS's voc and coco."""

from __future__ import annotations

import gc
import hashlib
import io
import json
import os
import random
import re
import shutil
import struct
import threading
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from tests.blocked_imports import run_without
from tests.images import generated
from tests.tfds_folders import prepare_multi_label
from tresnet_jax.data import tfds_reader
from tresnet_jax.data.tfds_reader import PreparedSplit, open_split, parse_example, prepare_command
from tresnet_jax.data.tfrecord import framed
from tresnet_jax.errors import InputError, UnreadableImage

NAME = "reader_shards"
SHARDS, TRAIN, TEST = 4, 80, 8  # 20 train records a shard: more than TFDS's interleave block of 16
CLASSES = ["cat", "dog", "eel"]
SKIP = {"image": tfds.decode.SkipDecoding()}


def _builder(data_dir: Path, file_format: str):
    """An unregistered builder of 16x16 PNGs, each with its own pixels, labelled i % 3."""

    def info(self):
        features = {
            "image": tfds.features.Image(encoding_format="png"),
            "label": tfds.features.ClassLabel(names=CLASSES),
        }
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

    def split_generators(self, dl_manager):
        return {"train": examples(TRAIN), "test": examples(TEST, seed=1000)}

    def examples(count, seed=0):
        for i in range(count):
            yield i, {"image": generated(seed + i, 16, 16), "label": i % len(CLASSES)}

    namespace = {
        "VERSION": tfds.core.Version("1.0.0"),
        "_info": info,
        "_split_generators": split_generators,
        "_generate_examples": None,
    }
    builder = type("ReaderShards", (tfds.core.GeneratorBasedBuilder,), namespace, skip_registration=True)
    return builder(data_dir=str(data_dir), file_format=file_format)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> dict[str, Path]:
    """{file format: data dir} of the same dataset, each split in SHARDS shards."""
    roots = {}
    for file_format in ("tfrecord", "array_record"):
        roots[file_format] = tmp_path_factory.mktemp(file_format)
        _builder(roots[file_format], file_format).download_and_prepare(
            download_config=tfds.download.DownloadConfig(num_shards=SHARDS)
        )
    return roots


@pytest.fixture(scope="module")
def expected(prepared) -> list[tuple[bytes, int]]:
    """(image bytes, label) of each train record, in split order, as TFDS reads them one by one."""
    builder = tfds.builder_from_directory(str(prepared["tfrecord"] / NAME / "1.0.0"))
    records = []
    for i in range(TRAIN):
        data = builder.as_dataset(split=f"train[{i}:{i + 1}]", shuffle_files=False, decoders=SKIP)
        (example,) = data.as_numpy_iterator()
        records.append((bytes(example["image"]), int(example["label"])))
    return records


def _version_dir(root: Path) -> Path:
    return root / NAME / "1.0.0"


def _copy(root: Path, destination: Path) -> Path:
    """A copy of the prepared dataset under ``destination`` (a data dir) to damage; its version folder."""
    return Path(shutil.copytree(_version_dir(root), destination / NAME / "1.0.0"))


def _shard(version_dir: Path, index: int, split: str = "train", file_format: str = "tfrecord") -> Path:
    return version_dir / f"{NAME}-{split}.{file_format}-{index:05d}-of-{SHARDS:05d}"


def _payload_offsets(path: Path) -> list[tuple[int, int]]:
    """(start, length) of each record's payload in a tfrecord file."""
    data, offsets, pos = path.read_bytes(), [], 0
    while pos < len(data):
        (length,) = struct.unpack_from("<Q", data, pos)
        offsets.append((pos + 12, length))
        pos += 12 + length + 4
    return offsets


def test_split_has_several_full_shards(prepared):
    info = json.loads((_version_dir(prepared["tfrecord"]) / "dataset_info.json").read_text())
    (train,) = (split for split in info["splits"] if split["name"] == "train")
    lengths = [int(n) for n in train["shardLengths"]]
    assert len(lengths) == SHARDS
    assert all(n > 16 for n in lengths)
    assert sum(lengths) == TRAIN
    assert all(_shard(_version_dir(prepared["tfrecord"]), i).is_file() for i in range(SHARDS))


def test_records_are_what_tfds_gives_for_each_index(prepared, expected):
    split = open_split(f"{NAME}:train", str(prepared["tfrecord"]))
    assert isinstance(split, PreparedSplit)
    assert (split.dataset, split.split, split.class_names, len(split)) == (f"{NAME}/1.0.0", "train", CLASSES, TRAIN)
    assert split.name == f"{NAME}/1.0.0:train"
    assert split.describe(7) == f"{NAME}/1.0.0:train[7]"
    assert [split.record(i) for i in range(TRAIN)] == expected
    assert len({image for image, _ in expected}) == TRAIN
    assert Image.open(io.BytesIO(expected[0][0])).size == (16, 16)


def test_split_order_is_the_shard_files_read_in_order(prepared, expected):
    """TFDS's split order: shard files 0..N-1, records in file order. Its whole-split read with
    shuffle_files=False is not that order: it interleaves the shards in blocks of 16 records."""
    import tensorflow as tf  # here, not at import: collecting the tests needs no TensorFlow

    version_dir = _version_dir(prepared["tfrecord"])
    files = [str(_shard(version_dir, i)) for i in range(SHARDS)]
    raw = [parse_example(record.numpy()) for record in tf.data.TFRecordDataset(files)]
    assert [(example["image"][0], example["label"][0]) for example in raw] == expected

    builder = tfds.builder_from_directory(str(version_dir))

    def read(**options):
        data = builder.as_dataset(split="train", shuffle_files=False, decoders=SKIP, **options)
        return [(bytes(example["image"]), int(example["label"])) for example in data.as_numpy_iterator()]

    assert read(read_config=tfds.ReadConfig(interleave_cycle_length=1)) == expected
    per_shard = TRAIN // SHARDS
    interleaved = [
        shard * per_shard + position
        for block in range(0, per_shard, 16)
        for shard in range(SHARDS)
        for position in range(block, min(block + 16, per_shard))
    ]
    assert read() == [expected[i] for i in interleaved]


def test_array_record_split(prepared, expected):
    """TFDS reads array_record only through its random-access data source; TFDS writes the same
    record order as for tfrecord."""
    builder = tfds.builder_from_directory(str(_version_dir(prepared["array_record"])))
    source = builder.as_data_source("train", decoders=SKIP)
    split = open_split(f"{NAME}:train", str(prepared["array_record"]))
    records = [split.record(i) for i in range(len(split))]
    assert records == [(bytes(source[i]["image"]), int(source[i]["label"])) for i in range(len(source))]
    assert records == expected


@pytest.mark.parametrize("file_format", ["tfrecord", "array_record"])
def test_threads_read_what_one_thread_reads(prepared, file_format):
    indices = [random.Random(seed).randrange(TRAIN) for seed in range(400)]
    sequential = open_split(f"{NAME}:train", str(prepared[file_format]))
    wanted = [sequential.record(i) for i in indices]
    split = open_split(f"{NAME}:train", str(prepared[file_format]))  # no shard opened yet: threads race to
    start, got = threading.Barrier(8), [None] * len(indices)

    def work(thread):
        start.wait()
        for k in range(thread, len(indices), 8):
            got[k] = split.record(indices[k])

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert got == wanted


@pytest.mark.slow
def test_reads_without_tensorflow_or_tfds(prepared, expected, multi_label, multi_expected):
    digest = hashlib.sha256(b"".join(image + bytes([label]) for image, label in expected)).hexdigest()
    code = f"""
import hashlib, sys
from tresnet_jax.errors import InputError
from tresnet_jax.data.tfds_reader import open_split
split = open_split("{NAME}:train", {str(prepared["tfrecord"])!r})
records = map(split.record, range(len(split)))
print(hashlib.sha256(b"".join(image + bytes([label]) for image, label in records)).hexdigest())
try:
    open_split("{NAME}:train", {str(prepared["array_record"])!r})
except InputError as error:
    print(error)
for spec in ("voc/2007:train+validation", "coco/2017:train+validation"):
    split = open_split(spec, {str(multi_label)!r})
    print([split.record(i)[1] for i in range(len(split))])
print(sorted(name for name in sys.modules if name.partition(".")[0] in {{"tensorflow", "tensorflow_datasets"}}))
"""
    done = run_without({"tensorflow", "tensorflow_datasets", "array_record"}, code)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == digest
    assert lines[1] == (
        f"dataset {NAME}/1.0.0 is stored as array_record files, which need the array_record package: "
        "pip install array_record"
    )
    for line, layout in zip(lines[2:4], ("voc", "coco"), strict=True):
        rows = multi_expected[layout]["train"] + multi_expected[layout]["validation"]
        assert line == str([labels for _, labels in rows])
    assert lines[4] == "[]"


def test_index_reads_only_the_headers(prepared, monkeypatch):
    split = open_split(f"{NAME}:train", str(prepared["tfrecord"]))
    sizes = []
    pread = os.pread

    def counting(fd, size, offset):
        sizes.append(size)
        return pread(fd, size, offset)

    monkeypatch.setattr(os, "pread", counting)
    image, _ = split.record(TRAIN // SHARDS)  # the first record of shard 1
    per_shard = TRAIN // SHARDS
    assert sizes[:per_shard] == [12] * per_shard
    assert len(sizes) == per_shard + 1
    assert len(image) < sizes[-1] < 2 * len(image)  # the payload alone: the Example around the image
    split.record(TRAIN // SHARDS + 5)
    assert len(sizes) == per_shard + 2


def test_descriptors_kept_open_within_the_budget(prepared, expected, monkeypatch):
    monkeypatch.setattr(tfds_reader, "_KEEP_OPEN", threading.Semaphore(1))
    gc.collect()
    before = len(os.listdir("/proc/self/fd"))
    split = open_split(f"{NAME}:train", str(prepared["tfrecord"]))
    assert [split.record(i) for i in range(TRAIN)] == expected
    assert len(os.listdir("/proc/self/fd")) == before + 1
    del split
    gc.collect()
    assert len(os.listdir("/proc/self/fd")) == before


def test_split_choice_and_index_range(prepared):
    root = str(prepared["tfrecord"])
    assert open_split(NAME, root).split == "test"  # no validation split
    assert open_split(NAME, root, default_split="train").split == "train"
    assert open_split(f"{NAME}/1.0.0:train", root, default_split="test").split == "train"
    split = open_split(NAME, root)
    assert len(split) == TEST
    for index in (-1, TEST):
        with pytest.raises(IndexError, match=rf"index {index} outside \[0, {TEST}\)"):
            split.record(index)
    assert split.record(np.int64(TEST - 1)) == split.record(TEST - 1)


def test_newest_version_and_only_config(prepared, tmp_path):
    _copy(prepared["tfrecord"], tmp_path)
    for version in ("1.9.0", "1.10.0"):
        shutil.copytree(_version_dir(tmp_path), tmp_path / NAME / version)
    shutil.copytree(_version_dir(tmp_path), tmp_path / NAME / "2.0.0")
    (tmp_path / NAME / "2.0.0" / "dataset_info.json").unlink()  # not finished
    shutil.copytree(_version_dir(tmp_path), tmp_path / NAME / "incomplete.X1Y2_3.0.0")
    assert open_split(NAME, str(tmp_path)).dataset == f"{NAME}/1.10.0"
    assert open_split(f"{NAME}/1.9.0", str(tmp_path)).dataset == f"{NAME}/1.9.0"

    config_root = tmp_path / "configs"
    shutil.copytree(_version_dir(tmp_path), config_root / NAME / "small" / "1.0.0")
    assert open_split(NAME, str(config_root)).dataset == f"{NAME}/small/1.0.0"
    assert open_split(f"{NAME}/small/1.0.0:train", str(config_root)).name == f"{NAME}/small/1.0.0:train"
    shutil.copytree(_version_dir(tmp_path), config_root / NAME / "large" / "1.0.0")
    with _raises(f"dataset {NAME}: name its config, one of {NAME}/large, {NAME}/small"):
        open_split(NAME, str(config_root))


def test_data_dir_defaults_to_tfds_data_dir(prepared, monkeypatch):
    monkeypatch.setenv("TFDS_DATA_DIR", str(prepared["tfrecord"]))
    assert tfds_reader.default_data_dir() == prepared["tfrecord"]
    assert open_split(f"{NAME}:train").dataset == f"{NAME}/1.0.0"
    monkeypatch.delenv("TFDS_DATA_DIR")
    assert tfds_reader.default_data_dir() == Path("~/tensorflow_datasets").expanduser()
    assert prepare_command("mnist", None) == "prepare it with: tfds build mnist --data_dir ~/tensorflow_datasets"
    assert prepare_command("imagenet2012", "/data") == (
        "put ILSVRC2012_img_val.tar (and ILSVRC2012_img_train.tar) in /data/downloads/manual, then run: "
        "tfds build imagenet2012 --data_dir /data; or pass the extracted validation images with --val_dir"
    )


def _raises(message: str):
    """pytest.raises for an InputError whose message contains ``message``."""
    return pytest.raises(InputError, match=re.escape(message))


def test_unknown_and_unprepared_datasets(prepared, tmp_path):
    root = prepared["tfrecord"]
    with _raises(
        f"dataset no_such is not prepared in {root} (no folder no_such there); "
        f"prepare it with: tfds build no_such --data_dir {root}"
    ):
        open_split("no_such", str(root))
    missing = tmp_path / "nowhere"
    with _raises(
        f"dataset imagenet2012 is not prepared: the TFDS data dir {missing} does not exist; "
        f"put ILSVRC2012_img_val.tar (and ILSVRC2012_img_train.tar) in {missing}/downloads/manual"
    ):
        open_split("imagenet2012:validation", str(missing))
    (tmp_path / "half_done" / "incomplete.AB12_1.0.0").mkdir(parents=True)
    (tmp_path / "half_done" / "1.0.0").mkdir()
    with _raises(
        f"dataset half_done is not prepared in {tmp_path} ({tmp_path / 'half_done'} has no complete "
        f"version); prepare it with: tfds build half_done --data_dir {tmp_path}"
    ):
        open_split("half_done", str(tmp_path))
    with _raises(f"dataset {NAME}/9.9.9 is not prepared in {root} (prepared versions: 1.0.0); prepare it with"):
        open_split(f"{NAME}/9.9.9:train", str(root))


def test_unknown_split(prepared):
    with _raises(f"dataset {NAME}/1.0.0: no split 'validation'; it has train, test"):
        open_split(f"{NAME}:validation", str(prepared["tfrecord"]))


def test_truncated_shard(prepared, expected, tmp_path):
    version_dir = _copy(prepared["tfrecord"], tmp_path)
    cut, short = _shard(version_dir, 2), _shard(version_dir, 3)
    _, length = _payload_offsets(cut)[-1]
    size = cut.stat().st_size - 10
    os.truncate(cut, size)
    start, _ = _payload_offsets(short)[-1]
    os.truncate(short, start - 12)  # at a record's start: one record short
    split = open_split(f"{NAME}:train", str(tmp_path))
    assert split.record(0) == expected[0]
    with _raises(
        f"shard {cut} is truncated or corrupt: record 19: its {length} bytes run past the file's end "
        f"({size} bytes); prepare the dataset again"
    ):
        split.record(45)
    with _raises(f"shard {short} is truncated or corrupt: 19 records, dataset_info.json says 20; prepare"):
        split.record(60)
    _shard(version_dir, 1).unlink()
    with _raises(
        f"dataset {NAME}/1.0.0: 1 of the {SHARDS} shard files of split train are missing, the first "
        f"{_shard(version_dir, 1)}; prepare the dataset again"
    ):
        open_split(f"{NAME}:train", str(tmp_path))


def test_bad_length_header(prepared, tmp_path):
    version_dir = _copy(prepared["tfrecord"], tmp_path)
    path = _shard(version_dir, 1)
    start, length = _payload_offsets(path)[5]
    with path.open("r+b") as file:
        file.seek(start - 12)
        file.write(struct.pack("<Q", length - 1))
    split = open_split(f"{NAME}:train", str(tmp_path))
    with _raises(
        f"shard {path} is truncated or corrupt: record 5: bad length header at byte {start - 12} (checksum mismatch)"
    ):
        split.record(20)


def test_corrupt_payloads(prepared, expected, tmp_path):
    version_dir = _copy(prepared["tfrecord"], tmp_path)
    path = _shard(version_dir, 0)
    data = bytearray(path.read_bytes())
    image = expected[3][0]
    at = data.find(image) + len(image) // 2
    data[at : at + 8] = bytes(8)  # inside the PNG: the reader hands it on, decoding fails later
    start, length = _payload_offsets(path)[4]
    data[start : start + length] = b"\xff" * length  # not a protobuf message
    path.write_bytes(bytes(data))
    split = open_split(f"{NAME}:train", str(tmp_path))
    corrupt, label = split.record(3)
    assert label == expected[3][1]
    assert len(corrupt) == len(image)
    assert corrupt != image
    with _raises(f"{NAME}/1.0.0:train[4]: record 4 of {path} is not a tf.train.Example: "):
        split.record(4)


def test_truncated_array_record_shard(prepared, tmp_path):
    shutil.copytree(_version_dir(prepared["array_record"]), tmp_path / NAME / "1.0.0")
    path = _shard(tmp_path / NAME / "1.0.0", 1, file_format="array_record")
    os.truncate(path, 1000)
    split = open_split(f"{NAME}:train", str(tmp_path))
    split.record(0)
    with _raises(
        f"shard {path} is truncated or corrupt: array_record cannot read it, dataset_info.json says 20 "
        "records; prepare the dataset again"
    ):
        split.record(25)


def _edit_features(version_dir: Path, edit) -> None:
    path = version_dir / "features.json"
    features = json.loads(path.read_text())
    edit(features["featuresDict"]["features"])
    path.write_text(json.dumps(features))


def test_not_an_image_classification_dataset(prepared, tmp_path):
    version_dir = _copy(prepared["tfrecord"], tmp_path)
    features = (version_dir / "features.json").read_text()

    def as_tensor(features):
        tensor = {"shape": {"dimensions": ["16", "16", "3"]}, "dtype": "uint8", "encoding": "none"}
        features["image"] = {
            "pythonClassName": "tensorflow_datasets.core.features.tensor_feature.Tensor",
            "tensor": tensor,
        }

    _edit_features(version_dir, as_tensor)
    with _raises(
        f"dataset {NAME}/1.0.0 is not an image-classification dataset: it needs an 'image' Image feature "
        "and either a 'label' ClassLabel, a 'labels' Sequence of ClassLabel, or an 'objects' Sequence whose "
        "items have a 'label' ClassLabel; it has image (Tensor), label (ClassLabel)"
    ):
        open_split(f"{NAME}:train", str(tmp_path))
    (version_dir / "features.json").write_text(features)
    _edit_features(version_dir, lambda features: features["image"]["image"].update(dtype="float32"))
    with _raises(f"dataset {NAME}/1.0.0: its images are float32 arrays, not encoded 8-bit images"):
        open_split(f"{NAME}:train", str(tmp_path))


def test_class_names(prepared, tmp_path):
    version_dir = _copy(prepared["tfrecord"], tmp_path)
    (version_dir / "label.labels.txt").unlink()
    assert open_split(NAME, str(tmp_path)).class_names == ["0", "1", "2"]
    legacy = {  # features.json as TFDS wrote it before its FeaturesDict proto
        "type": "tensorflow_datasets.core.features.features_dict.FeaturesDict",
        "content": {
            "image": {
                "type": "tensorflow_datasets.core.features.image_feature.Image",
                "content": {"shape": [None, None, 3], "dtype": "uint8", "encoding_format": "png"},
            },
            "label": {
                "type": "tensorflow_datasets.core.features.class_label_feature.ClassLabel",
                "content": {"names": ["x", "y", "z"]},
            },
        },
    }
    (version_dir / "features.json").write_text(json.dumps(legacy))
    assert tfds.builder_from_directory(str(version_dir)).info.features["label"].names == ["x", "y", "z"]
    assert open_split(NAME, str(tmp_path)).class_names == ["x", "y", "z"]


def test_parse_example_agrees_with_tensorflow():
    import tensorflow as tf

    features = {
        "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"\x89PNG" + bytes(300), b""])),
        "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[0, 7, -1, 2**63 - 1, -(2**63), 300])),
        "box": tf.train.Feature(float_list=tf.train.FloatList(value=[0.5, -2.25, 1e30])),
        "none": tf.train.Feature(),
        "empty": tf.train.Feature(int64_list=tf.train.Int64List()),
    }
    data = tf.train.Example(features=tf.train.Features(feature=features)).SerializeToString()
    assert parse_example(data) == {
        "image": [b"\x89PNG" + bytes(300), b""],
        "label": [0, 7, -1, 2**63 - 1, -(2**63), 300],
        "box": [0.5, -2.25, np.float32(1e30).item()],
        "none": [],
        "empty": [],
    }
    # Unpacked int64 and float values (field 1 repeated), which TensorFlow also accepts.
    unpacked_ints = b"\x08\x05\x08\x06"
    unpacked_floats = b"\x0d" + struct.pack("<f", 1.5)
    entry = b"\x0a\x01a\x12" + bytes([2 + len(unpacked_ints)]) + b"\x1a" + bytes([len(unpacked_ints)]) + unpacked_ints
    entry2 = b"\x0a\x01b\x12" + bytes([2 + len(unpacked_floats)]) + b"\x12" + bytes([len(unpacked_floats)])
    entry2 += unpacked_floats
    features_message = b"\x0a" + bytes([len(entry)]) + entry + b"\x0a" + bytes([len(entry2)]) + entry2
    data = b"\x0a" + bytes([len(features_message)]) + features_message
    parsed = tf.io.parse_single_example(
        data, {"a": tf.io.FixedLenFeature([2], tf.int64), "b": tf.io.FixedLenFeature([1], tf.float32)}
    )
    assert parse_example(data) == {"a": parsed["a"].numpy().tolist(), "b": parsed["b"].numpy().tolist()}
    for bad in (b"\x0a\x05\x0a", b"\xff" * 12, b"\x0b"):
        with pytest.raises(ValueError, match=r"runs past|varint|wire type"):
            parse_example(bad)


# Multi-label datasets, laid out as TFDS's voc/2007 and coco/2017 (tests/tfds_folders.py).

VOC_CLASSES = ["aeroplane", "bicycle", "bird", "boat", "bottle"]
VOC_SPLITS = {  # the objects of each image, by class
    "train": [[0], [1, 2], [3, 3, 0], [], [4, 1, 2], [2]],
    "validation": [[1], [0, 4], [2, 2], [3]],
    "test": [[4], [], [0, 1]],
}
COCO_CLASSES = ["person", "bicycle", "car", "motorcycle", "airplane", "bus"]
COCO_SPLITS = {
    "train": [[0, 0, 2], [], [5], [1, 3, 1, 0], [2, 2], [4]],
    "validation": [[0], [], [3, 5], [1, 1]],
}
LAYOUTS = {  # layout: (name/config, version folder, splits, class names, the key of the labels read)
    "voc": ("voc/2007", "voc/2007/5.0.0", VOC_SPLITS, VOC_CLASSES, "labels"),
    "coco": ("coco/2017", "coco/2017/1.1.0", COCO_SPLITS, COCO_CLASSES, "objects/label"),
}
MULTI_SHARDS = 3


@pytest.fixture(scope="module")
def multi_label(tmp_path_factory) -> Path:
    """A data dir with both datasets, each split in MULTI_SHARDS shards."""
    root = tmp_path_factory.mktemp("multi_label")
    for layout, (name, _, splits, classes, _) in LAYOUTS.items():
        assert prepare_multi_label(layout, root, splits, classes, num_shards=MULTI_SHARDS) == name
    return root


def _tfds_labels(root: Path, layout: str) -> dict[str, list[tuple[bytes, tuple[int, ...], tuple[int, ...]]]]:
    """{split: (image bytes, classes of 'labels' (voc) or (), classes of the objects) of each
    record}, as TFDS reads ``split[i:i+1]``."""
    _, version_dir, splits, _, _ = LAYOUTS[layout]
    builder = tfds.builder_from_directory(str(root / version_dir))
    records = {}
    for split, images in splits.items():
        records[split] = []
        for i in range(len(images)):
            data = builder.as_dataset(split=f"{split}[{i}:{i + 1}]", shuffle_files=False, decoders=SKIP)
            (example,) = data.as_numpy_iterator()
            labels = tuple(sorted(set(example["labels"].tolist()))) if layout == "voc" else ()
            objects = tuple(sorted(set(example["objects"]["label"].tolist())))
            records[split].append((bytes(example["image"]), labels, objects))
    return records


@pytest.fixture(scope="module")
def multi_expected(multi_label) -> dict[str, dict[str, list[tuple[bytes, tuple[int, ...]]]]]:
    """{layout: {split: (image bytes, classes present) of each record}}, as TFDS reads them."""
    expected = {}
    for layout in LAYOUTS:
        records = _tfds_labels(multi_label, layout)
        expected[layout] = {
            split: [(image, labels if layout == "voc" else objects) for image, labels, objects in rows]
            for split, rows in records.items()
        }
        if layout == "voc":  # voc's 'labels' are the classes of its objects
            assert all(labels == objects for rows in records.values() for _, labels, objects in rows)
    return expected


@pytest.mark.parametrize("layout", LAYOUTS)
def test_multi_label_records_are_what_tfds_gives(multi_label, multi_expected, layout):
    name, version_dir, splits, classes, key = LAYOUTS[layout]
    builder = tfds.builder_from_directory(str(multi_label / version_dir))
    features = builder.info.features
    assert (features["labels"].feature if layout == "voc" else features["objects"]["label"]).names == classes
    for split, images in splits.items():
        shards = json.loads((multi_label / version_dir / "dataset_info.json").read_text())["splits"]
        (lengths,) = (entry["shardLengths"] for entry in shards if entry["name"] == split)
        assert len(lengths) == MULTI_SHARDS
        source = open_split(f"{name}:{split}", str(multi_label))
        assert (source.multi_label, source.label_key, source.class_names) == (True, key, classes)
        assert (source.name, len(source)) == (f"{version_dir}:{split}", len(images))
        records = [source.record(i) for i in range(len(source))]
        assert records == multi_expected[layout][split]
        # What the builder was given, in TFDS's own order: the distinct classes of each image's objects.
        assert sorted(labels for _, labels in records) == sorted(tuple(sorted(set(i))) for i in images)
        for image, _ in records:
            decoded = Image.open(io.BytesIO(image))
            decoded.load()
            assert decoded.format == ("PNG" if layout == "voc" else "JPEG")
    assert open_split(f"{name.partition('/')[0]}:train", str(multi_label)).dataset == version_dir  # the one config
    assert () in [labels for _, labels in multi_expected[layout]["train"]]


def test_single_label_datasets_stay_single_label(prepared):
    split = open_split(f"{NAME}:train", str(prepared["tfrecord"]))
    assert (split.multi_label, split.label_key) == (False, "label")
    assert all(type(label) is int for _, label in map(split.record, range(3)))


def test_concatenated_splits(multi_label, multi_expected, prepared, expected):
    root = str(multi_label)
    both = open_split("voc/2007:train+validation", root)
    train, validation = multi_expected["voc"]["train"], multi_expected["voc"]["validation"]
    assert (both.split, both.name, len(both)) == ("train+validation", "voc/2007/5.0.0:train+validation", 10)
    assert both.parts == (("train", 6), ("validation", 4))
    assert len(both.shards) == 2 * MULTI_SHARDS
    assert [both.record(i) for i in range(len(both))] == train + validation
    assert [both.describe(i) for i in (0, 5, 6, 9)] == [
        "voc/2007/5.0.0:train[0]",
        "voc/2007/5.0.0:train[5]",
        "voc/2007/5.0.0:validation[0]",
        "voc/2007/5.0.0:validation[3]",
    ]
    with pytest.raises(IndexError, match=r"voc/2007/5.0.0:train\+validation: index 10 outside \[0, 10\)"):
        both.record(10)
    reverse = open_split("voc/2007:validation+train", root)
    assert [reverse.record(i) for i in range(len(reverse))] == validation + train
    coco = open_split("coco/2017", root, default_split="train + validation")
    assert coco.split == "train+validation"
    assert [coco.record(i) for i in range(len(coco))] == (
        multi_expected["coco"]["train"] + multi_expected["coco"]["validation"]
    )
    single = open_split(f"{NAME}:train+test", str(prepared["tfrecord"]))
    assert (len(single), single.multi_label, single.describe(TRAIN)) == (TRAIN + TEST, False, f"{NAME}/1.0.0:test[0]")
    assert [single.record(i) for i in range(TRAIN)] == expected
    assert single.record(TRAIN) == open_split(f"{NAME}:test", str(prepared["tfrecord"])).record(0)
    with _raises("dataset voc/2007/5.0.0: no split 'val'; it has "):
        open_split("voc/2007:train+val", root)
    with _raises("dataset voc/2007/5.0.0: no split ''; it has "):
        open_split("voc/2007:train+", root)
    with _raises("dataset voc/2007/5.0.0: split 'train' is named twice in 'train+validation+train'"):
        open_split("voc/2007:train+validation+train", root)


def _voc_copy(multi_label: Path, destination: Path) -> Path:
    return Path(shutil.copytree(multi_label / "voc/2007/5.0.0", destination / "voc/2007/5.0.0"))


def test_labels_come_from_the_first_layout_found(multi_label, multi_expected, prepared, tmp_path):
    """'labels' before 'objects'; without 'labels', the objects' classes (as for coco); a
    single-label dataset that also has 'labels' stays single-label."""
    version_dir = _voc_copy(multi_label, tmp_path)
    _edit_features(version_dir, lambda features: features.pop("labels"))
    split = open_split("voc/2007:train", str(tmp_path))
    assert (split.multi_label, split.label_key, split.class_names) == (True, "objects/label", VOC_CLASSES)
    assert [split.record(i) for i in range(len(split))] == multi_expected["voc"]["train"]

    single = _copy(prepared["tfrecord"], tmp_path / "single")
    voc_labels = json.loads((multi_label / "voc/2007/5.0.0/features.json").read_text())["featuresDict"]["features"]
    _edit_features(single, lambda features: features.update(labels=voc_labels["labels"]))
    assert open_split(f"{NAME}:train", str(tmp_path / "single")).multi_label is False


def test_none_of_the_label_layouts(multi_label, tmp_path):
    version_dir = _voc_copy(multi_label, tmp_path)

    def rename(features):
        features["tags"] = features.pop("labels")
        objects = features["objects"]["sequence"]["feature"]["featuresDict"]["features"]
        objects["category"] = objects.pop("label")

    _edit_features(version_dir, rename)
    with _raises(
        "dataset voc/2007/5.0.0 is not an image-classification dataset: it needs an 'image' Image feature and "
        "either a 'label' ClassLabel, a 'labels' Sequence of ClassLabel, or an 'objects' Sequence whose items have "
        "a 'label' ClassLabel; it has image (Image), image/filename (Text), labels_no_difficult (Sequence of "
        "ClassLabel), objects (Sequence of FeaturesDict), tags (Sequence of ClassLabel)"
    ):
        open_split("voc/2007:train", str(tmp_path))


def _rewrite_first_record(shard: Path, edit) -> None:
    """Replace record 0 of a tfrecord shard by its tf.train.Example as ``edit`` changes it."""
    import tensorflow as tf

    records = [bytes(record.numpy()) for record in tf.data.TFRecordDataset([str(shard)])]
    example = tf.train.Example.FromString(records[0])
    edit(example.features.feature)
    records[0] = example.SerializeToString()
    shard.write_bytes(b"".join(map(framed, records)))


def test_malformed_label_lists(multi_label, multi_expected, tmp_path):
    import tensorflow as tf

    version_dir = _voc_copy(multi_label, tmp_path)
    shard = version_dir / f"voc-train.tfrecord-00000-of-{MULTI_SHARDS:05d}"
    original = shard.read_bytes()
    image = multi_expected["voc"]["train"][0][0]
    where = f"voc/2007/5.0.0:train[0]: record 0 of {shard}: "

    def labels(**value):
        def edit(feature):
            feature["labels"].CopyFrom(tf.train.Feature(**value))

        return edit

    cases = [
        (labels(int64_list=tf.train.Int64List(value=[3, 1, 3])), (1, 3)),
        (labels(int64_list=tf.train.Int64List(value=[-1, 2])), (2,)),  # -1: TFDS's "no label"
        (labels(int64_list=tf.train.Int64List(value=[])), ()),
        (labels(), ()),
        (labels(int64_list=tf.train.Int64List(value=[7, 1, 5])), "its 'labels' has class 7, outside [0, 5)"),
        (labels(int64_list=tf.train.Int64List(value=[-2])), "its 'labels' has class -2, outside [0, 5)"),
        (labels(float_list=tf.train.FloatList(value=[1.0])), "its 'labels' is not a list of integers"),
        (labels(bytes_list=tf.train.BytesList(value=[b"bird"])), "its 'labels' is not a list of integers"),
        (lambda feature: feature.pop("labels"), "it has no 'labels'"),
        (lambda feature: feature.pop("image"), "its 'image' is not one encoded image"),
    ]
    for edit, outcome in cases:
        shard.write_bytes(original)
        _rewrite_first_record(shard, edit)
        split = open_split("voc/2007:train", str(tmp_path))
        if isinstance(outcome, tuple):
            assert split.record(0) == (image, outcome)
        else:
            with pytest.raises(UnreadableImage, match=re.escape(where + outcome)):
                split.record(0)
        assert split.record(1) == multi_expected["voc"]["train"][1]


def test_multi_label_reads_only_the_image_and_labels(multi_label, monkeypatch):
    source = open_split("coco/2017:train", str(multi_label))
    data = source.shards[0].read(0)
    full = parse_example(data)
    assert set(full) == {
        "image",
        "image/filename",
        "image/id",
        *(f"objects/{k}" for k in ("id", "area", "bbox", "label", "is_crowd")),
    }
    assert parse_example(data, {"image", "objects/label"}) == {k: full[k] for k in ("image", "objects/label")}
    decoded = []
    feature = tfds_reader._feature
    monkeypatch.setattr(tfds_reader, "_feature", lambda value: decoded.append(value) or feature(value))
    source.record(0)
    assert len(decoded) == 2


def test_multi_label_class_names_and_older_features_json(multi_label, tmp_path):
    """Class names from TFDS's class-name files (labels.labels.txt, objects-label.labels.txt),
    else the ClassLabel's; features.json as TFDS wrote it before its FeaturesDict proto."""
    assert {path.name for path in (multi_label / "voc/2007/5.0.0").glob("*.labels.txt")} == {
        "labels.labels.txt",
        "labels_no_difficult.labels.txt",
        "objects-label.labels.txt",
        "objects-pose.labels.txt",
    }
    assert [path.name for path in (multi_label / "coco/2017/1.1.0").glob("*.labels.txt")] == [
        "objects-label.labels.txt"
    ]

    def legacy(kind, content):
        module = {"FeaturesDict": "features_dict", "Sequence": "sequence_feature", "ClassLabel": "class_label_feature"}
        module.update(Image="image_feature", Text="text_feature", Tensor="tensor_feature", BBoxFeature="bounding_boxes")
        return {"type": f"tensorflow_datasets.core.features.{module[kind]}.{kind}", "content": content}

    image = legacy("Image", {"shape": [None, None, 3], "dtype": "uint8", "encoding_format": "png"})

    def voc(label):
        labels = legacy("Sequence", {"feature": legacy("ClassLabel", label), "length": None})
        return json.dumps(legacy("FeaturesDict", {"image": image, "labels": labels}))

    def names(version_dir, feature):
        """The class names TFDS reads for ``feature``, which the reader must read too."""
        features = tfds.builder_from_directory(str(version_dir)).info.features
        tfds_names = (features["labels"].feature if feature == "labels" else features["objects"]["label"]).names
        dataset = version_dir.relative_to(tmp_path).parent.as_posix()
        source = open_split(f"{dataset}:train", str(tmp_path))
        assert (source.multi_label, source.label_key, source.class_names) == (True, feature, tfds_names)
        return tfds_names

    version_dir = _voc_copy(multi_label, tmp_path)
    (version_dir / "features.json").write_text(voc({"num_classes": 5}))
    assert names(version_dir, "labels") == VOC_CLASSES  # from labels.labels.txt
    (version_dir / "features.json").write_text(voc({"names": list("vwxyz")}))
    assert names(version_dir, "labels") == list("vwxyz")  # features.json's names first, as TFDS
    (version_dir / "features.json").write_text(voc({"num_classes": 5}))
    (version_dir / "labels.labels.txt").unlink()
    assert names(version_dir, "labels") == list("01234")

    objects = {
        "label": legacy("ClassLabel", {"num_classes": 6}),
        "bbox": legacy("BBoxFeature", {}),
        "is_crowd": legacy("Tensor", {"shape": [], "dtype": "bool"}),
    }
    coco = legacy(
        "FeaturesDict",
        {"image": image, "objects": legacy("Sequence", {"feature": legacy("FeaturesDict", objects), "length": None})},
    )
    coco_dir = Path(shutil.copytree(multi_label / "coco/2017/1.1.0", tmp_path / "coco/2017/1.1.0"))
    (coco_dir / "features.json").write_text(json.dumps(coco))
    assert names(coco_dir, "objects/label") == COCO_CLASSES
    (coco_dir / "objects-label.labels.txt").unlink()
    assert names(coco_dir, "objects/label") == list("012345")
    (coco_dir / "features.json").write_text(json.dumps(legacy("FeaturesDict", {"image": image})))
    with _raises("dataset coco/2017/1.1.0 is not an image-classification dataset: "):
        open_split("coco/2017:train", str(tmp_path))
