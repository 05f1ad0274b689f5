"""Random access to a split of a TFDS dataset prepared on disk, with neither TensorFlow nor
tensorflow_datasets installed.

Index ``i`` is the ``i``-th record in TFDS's own split order, the one
``builder.as_dataset(split=f"{split}[i:i+1]", shuffle_files=False)`` returns: the shards in the
order of ``shardLengths`` in ``dataset_info.json`` (0 to N-1), the records of each in file order.
(A whole-split ``as_dataset(shuffle_files=False)`` does not read in that order: it interleaves 16
shards in blocks of 16 records, unless ``ReadConfig(interleave_cycle_length=1)``.)

Labels: an image-classification dataset's ``label`` (one class); a multi-label dataset's classes
present, from ``labels`` (a Sequence of ClassLabel, as ``voc``) or else the distinct ``label``s of
its ``objects`` (as ``coco``). ``NAME:train+validation`` reads the splits one after the other.

A tfrecord shard is indexed on first use by walking its record headers (12 bytes a record, the
payloads are skipped), then read with ``os.pread``: any number of threads can read at once.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import itertools
import json
import operator
import os
import re
import resource
import struct
import threading
import weakref
from array import array
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from tresnet_jax.data.tfrecord import FOOTER_SIZE, HEADER, masked_crc32c
from tresnet_jax.errors import InputError, UnreadableImage

if TYPE_CHECKING:
    from tresnet_jax.data.sources import Label

DEFAULT_SPLITS = {"imagenet2012": "validation", "imagenet_v2": "test"}

_VERSION = re.compile(r"\d+\.\d+\.\d+")
_DEFAULT_TEMPLATE = "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}"
_FORMATS = ("tfrecord", "array_record")


def default_data_dir() -> Path:
    """Where TFDS prepares datasets unless told otherwise."""
    return Path(os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets").expanduser()


def prepare_command(name: str, data_dir: str | None) -> str:
    """The exact command that prepares a TFDS dataset where eval.py will look for it."""
    target = data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
    if name == "imagenet2012":
        return (
            f"put ILSVRC2012_img_val.tar (and ILSVRC2012_img_train.tar) in {target}/downloads/manual, then run: "
            f"tfds build imagenet2012 --data_dir {target}; or pass the extracted validation images with --val_dir"
        )
    return f"prepare it with: tfds build {name} --data_dir {target}"


# tf.train.Example, decoded from the protobuf wire format. The schema is frozen:
# Example{1: Features}, Features{1: map<string, Feature>} (entries: 1 key, 2 value),
# Feature{oneof 1 BytesList, 2 FloatList, 3 Int64List}, each list {1: repeated value}.

_VARINT, _FIXED64, _LENGTH_DELIMITED, _FIXED32 = 0, 1, 2, 5


def _varint(data: memoryview, pos: int) -> tuple[int, int]:
    """The varint at ``pos`` and the position after it."""
    result = shift = 0
    while pos < len(data) and shift < 70:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
    raise ValueError("truncated or overlong varint")


def _fields(data: memoryview) -> Iterator[tuple[int, int, int | memoryview]]:
    """(field number, wire type, value) of each field of a message: an int for varints, the raw
    bytes for the other wire types."""
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == _VARINT:
            value, pos = _varint(data, pos)
        else:
            if wire == _LENGTH_DELIMITED:
                size, pos = _varint(data, pos)
            elif wire in (_FIXED64, _FIXED32):
                size = 8 if wire == _FIXED64 else 4
            else:
                raise ValueError(f"field {number} has unsupported wire type {wire}")
            value, pos = data[pos : pos + size], pos + size
            if pos > len(data):
                raise ValueError(f"field {number} runs past the end of its message")
        yield number, wire, value


def _values(data: memoryview, number: int, wires: tuple[int, ...]) -> Iterator[int | memoryview]:
    """The values of field ``number``; a wire type outside ``wires`` is malformed."""
    for field, wire, value in _fields(data):
        if field == number:
            if wire not in wires:
                raise ValueError(f"field {number} has wire type {wire}, expected one of {wires}")
            yield value


def _signed64(value: int) -> int:
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


def _int64_list(data: memoryview) -> list[int]:
    values = []
    for value in _values(data, 1, (_VARINT, _LENGTH_DELIMITED)):
        if isinstance(value, int):
            values.append(_signed64(value))
            continue
        pos = 0
        while pos < len(value):
            item, pos = _varint(value, pos)
            values.append(_signed64(item))
    return values


def _float_list(data: memoryview) -> list[float]:
    values = []
    for value in _values(data, 1, (_FIXED32, _LENGTH_DELIMITED)):
        if len(value) % 4:
            raise ValueError(f"packed floats of {len(value)} bytes")
        values += struct.unpack(f"<{len(value) // 4}f", value)
    return values


def _feature(data: memoryview) -> list[bytes] | list[float] | list[int]:
    values: list = []
    for number, wire, value in _fields(data):
        if number in (1, 2, 3) and wire != _LENGTH_DELIMITED:
            raise ValueError(f"Feature field {number} has wire type {wire}")
        if number == 1:
            values = [bytes(item) for item in _values(value, 1, (_LENGTH_DELIMITED,))]
        elif number == 2:
            values = _float_list(value)
        elif number == 3:
            values = _int64_list(value)
    return values


def parse_example(data: bytes, keys: Collection[str] | None = None) -> dict[str, list[bytes] | list[float] | list[int]]:
    """A serialized ``tf.train.Example`` as {feature name: its values}: every feature, or those of
    ``keys`` alone (the others' values are skipped, not decoded). Raises ValueError when ``data``
    is not one."""
    example = {}
    for features in _values(memoryview(data), 1, (_LENGTH_DELIMITED,)):
        for entry in _values(features, 1, (_LENGTH_DELIMITED,)):
            key, value = b"", memoryview(b"")
            for number, wire, item in _fields(entry):
                if number in (1, 2) and wire != _LENGTH_DELIMITED:
                    raise ValueError(f"map entry field {number} has wire type {wire}")
                if number == 1:
                    key = bytes(item)
                elif number == 2:
                    value = item
            name = key.decode()
            if keys is None or name in keys:
                example[name] = _feature(value)
    return example


# Shard files.


def _spare_descriptors() -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return (1 << 16 if soft == resource.RLIM_INFINITY else soft) // 2


# Shards keep their file open while the process has descriptors to spare (ImageNet's train split
# has 1024 shards, and 1024 is a common soft limit); past that, each read opens its shard anew.
_KEEP_OPEN = threading.Semaphore(_spare_descriptors())


def _release(close, handle, budget: threading.Semaphore) -> None:
    close(handle)
    budget.release()


class _Shard:
    """One shard file of ``size`` records, opened on first use by any number of threads.
    Subclasses open, read and close its handle: ``_open``, ``_read`` and ``_close``."""

    def __init__(self, path: Path, size: int):
        self.path = path
        self.size = size
        self._lock = threading.Lock()
        self._ready = False
        self._kept = None

    def __getstate__(self) -> dict:
        """Pickled (for worker processes) without its lock and open handle; the copy opens the
        file again on first use."""
        state = self.__dict__.copy()
        state.update(_lock=None, _ready=False, _kept=None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _lock=threading.Lock())

    def read(self, position: int) -> bytes:
        """The payload of record ``position`` of this shard."""
        handle = self._handle()
        if handle is not None:
            return self._read(handle, position)
        handle = self._open()
        try:
            return self._read(handle, position)
        finally:
            self._close(handle)

    def _handle(self):
        """The handle kept open, or None when there are no descriptors to spare."""
        if not self._ready:
            with self._lock:
                if not self._ready:
                    handle, budget = self._open(), _KEEP_OPEN
                    if budget.acquire(blocking=False):
                        self._kept = handle
                        weakref.finalize(self, _release, self._close, handle, budget)
                    else:
                        self._close(handle)
                    self._ready = True
        return self._kept

    def _damaged(self, detail: str) -> InputError:
        return InputError(f"shard {self.path} is truncated or corrupt: {detail}; prepare the dataset again")


class _TfrecordShard(_Shard):
    """tfrecord framing: payload length (uint64 LE), its masked CRC (uint32), payload, payload's
    masked CRC (uint32). ``_offsets[k]`` is where record ``k`` starts, the last one the file's end."""

    _offsets: array | None = None

    def _open(self) -> int:
        if self._offsets is None:
            with open(self.path, "rb") as file:
                self._offsets = self._walk(file.fileno())
        return os.open(self.path, os.O_RDONLY)

    @staticmethod
    def _close(handle: int) -> None:
        os.close(handle)

    def _walk(self, fd: int) -> array:
        """The record offsets, from the headers alone."""
        end = os.fstat(fd).st_size
        offsets = array("Q", [0])
        while offsets[-1] < end:
            record, start = len(offsets) - 1, offsets[-1]
            header = os.pread(fd, HEADER.size, start)
            if len(header) < HEADER.size:
                raise self._damaged(f"record {record}: the file ends ({end} bytes) inside its header")
            length, crc = HEADER.unpack(header)
            if masked_crc32c(header[:8]) != crc:
                raise self._damaged(f"record {record}: bad length header at byte {start} (checksum mismatch)")
            offsets.append(start + HEADER.size + length + FOOTER_SIZE)
            if offsets[-1] > end:
                raise self._damaged(f"record {record}: its {length} bytes run past the file's end ({end} bytes)")
        if len(offsets) - 1 != self.size:
            raise self._damaged(f"{len(offsets) - 1} records, dataset_info.json says {self.size}")
        return offsets

    def _read(self, fd: int, position: int) -> bytes:
        start = self._offsets[position] + HEADER.size
        length = self._offsets[position + 1] - start - FOOTER_SIZE
        data = os.pread(fd, length, start)
        if len(data) != length:
            raise self._damaged(f"record {position}: the file became shorter after it was opened")
        return data


class _ArrayRecordShard(_Shard):
    """An array_record file, read with the array_record package (its readers are thread-safe)."""

    def __init__(self, path: Path, size: int, reader_class: type):
        super().__init__(path, size)
        self._reader_class = reader_class

    def _open(self):
        reader = self._reader_class(str(self.path), options="readahead_buffer_size:0,max_parallelism:0")
        count = reader.num_records() if reader.ok() else None
        if count != self.size:
            with contextlib.suppress(RuntimeError):  # a reader that failed raises its error again
                reader.close()
            why = "array_record cannot read it" if count is None else f"{count} records"
            raise self._damaged(f"{why}, dataset_info.json says {self.size} records")
        return reader

    @staticmethod
    def _close(reader) -> None:
        reader.close()

    @staticmethod
    def _read(reader, position: int) -> bytes:
        return reader.read([position])[0]


@dataclasses.dataclass
class PreparedSplit:
    """A split of an image-classification dataset prepared by TFDS, or several splits read one
    after the other (``train+validation``): (encoded image, label) by position in TFDS's split
    order. A label is one class (``int``), or for a multi-label dataset the sorted tuple of the
    classes present, possibly empty; ``label_key`` is the feature it is read from."""

    dataset: str  # name[/config]/version, as found on disk
    split: str  # one split, or several joined by "+"
    class_names: list[str]
    shards: list[_Shard] = dataclasses.field(repr=False)
    splits: tuple[str, ...] = ()  # every split the dataset has
    multi_label: bool = False
    label_key: str = "label"  # the tf.train.Example feature holding the label(s)
    parts: tuple[tuple[str, int], ...] = ()  # (split, its records) of each split read, in order

    def __post_init__(self):
        self._ends = list(itertools.accumulate(shard.size for shard in self.shards))
        self.parts = self.parts or ((self.split, len(self)),)
        self._part_ends = list(itertools.accumulate(size for _, size in self.parts))
        self._keys = frozenset(("image", self.label_key))

    def __len__(self) -> int:
        return self._ends[-1] if self._ends else 0

    @property
    def name(self) -> str:
        return f"{self.dataset}:{self.split}"

    def describe(self, index: int) -> str:
        """``dataset:split[i]``; for several splits, the one that record ``index`` is in and its
        position there."""
        if len(self.parts) == 1:
            return f"{self.name}[{index}]"
        part = min(bisect.bisect_right(self._part_ends, index), len(self.parts) - 1)
        return f"{self.dataset}:{self.parts[part][0]}[{index - (self._part_ends[part - 1] if part else 0)}]"

    def record(self, index: int) -> tuple[bytes, Label]:
        """(encoded image bytes, label) of record ``index`` of the split."""
        index = operator.index(index)
        if not 0 <= index < len(self):
            raise IndexError(f"{self.name}: index {index} outside [0, {len(self)})")
        number = bisect.bisect_right(self._ends, index)
        position = index - (self._ends[number - 1] if number else 0)
        shard = self.shards[number]
        data = shard.read(position)
        where = f"record {position} of {shard.path}"
        try:
            example = parse_example(data, self._keys)
        except ValueError as error:
            raise UnreadableImage(self.describe(index), f"{where} is not a tf.train.Example: {error}") from error
        image, label = example.get("image", []), example.get(self.label_key)
        if len(image) != 1 or not isinstance(image[0], bytes):
            raise UnreadableImage(self.describe(index), f"{where}: its 'image' is not one encoded image")
        if self.multi_label:
            return image[0], self._classes(label, index, where)
        if label is None or len(label) != 1 or not isinstance(label[0], int):
            raise UnreadableImage(self.describe(index), f"{where}: its 'label' is not one integer")
        return image[0], label[0]

    def _classes(self, values: list | None, index: int, where: str) -> tuple[int, ...]:
        """The classes present: a list's distinct values, sorted, less TFDS's -1 (no label)."""
        if values is None:
            raise UnreadableImage(self.describe(index), f"{where}: it has no '{self.label_key}'")
        if not all(type(value) is int for value in values):
            raise UnreadableImage(self.describe(index), f"{where}: its '{self.label_key}' is not a list of integers")
        classes = sorted(set(values) - {-1})
        if classes and (classes[0] < 0 or classes[-1] >= len(self.class_names)):
            bad = classes[0] if classes[0] < 0 else classes[-1]
            raise UnreadableImage(
                self.describe(index),
                f"{where}: its '{self.label_key}' has class {bad}, outside [0, {len(self.class_names)})",
            )
        return tuple(classes)


def open_split(spec: str, data_dir: str | None = None, default_split: str = "") -> PreparedSplit:
    """``spec`` is ``NAME[/CONFIG][/VERSION][:SPLIT[+SPLIT...]]`` (``imagenet2012``,
    ``imagenet2012/5.1.0:validation``, ``my_dataset:train``, ``voc/2007:train+validation``): the
    newest version prepared unless one is named; the split ``default_split``, else the dataset's
    usual evaluation split. Several splits are read one after the other, in the order named."""
    name, _, split = spec.partition(":")
    root = Path(data_dir).expanduser() if data_dir else default_data_dir()
    directory = _version_directory(root, name, data_dir)
    dataset = directory.relative_to(root).as_posix()
    info = _read_json(directory / "dataset_info.json")
    splits = {entry.get("name"): entry for entry in info.get("splits", [])}
    usual = next((s for s in ("validation", "test") if s in splits), "")
    split = split or default_split or DEFAULT_SPLITS.get(name.partition("/")[0]) or usual
    has = ", ".join(map(str, splits)) or "none"
    if not split:
        raise InputError(f"dataset {dataset}: no validation or test split (name one as NAME:SPLIT); it has {has}")
    parts = [part.strip() for part in split.split("+")]
    for part in parts:
        if part not in splits:
            raise InputError(f"dataset {dataset}: no split {part!r}; it has {has}")
    twice = next((part for i, part in enumerate(parts) if part in parts[:i]), None)
    if twice is not None:
        raise InputError(f"dataset {dataset}: split {twice!r} is named twice in {split!r}")
    labels = _labels(directory, dataset)
    shards, sizes = [], []
    for part in parts:
        part_shards = _shards(directory, dataset, info, splits[part])
        shards += part_shards
        sizes.append((part, sum(shard.size for shard in part_shards)))
    return PreparedSplit(
        dataset,
        "+".join(parts),
        labels.class_names,
        shards,
        tuple(map(str, splits)),
        labels.multi_label,
        labels.key,
        tuple(sizes),
    )


def _version_directory(root: Path, name: str, data_dir: str | None) -> Path:
    """``root/NAME[/CONFIG]/VERSION``: the version named, else the newest prepared."""
    parts = name.split("/")
    version = _version_key(parts.pop()) if len(parts) > 1 and _VERSION.fullmatch(parts[-1]) else None
    base = root.joinpath(*parts)
    command = prepare_command("/".join(parts), data_dir)
    if not root.is_dir():
        raise InputError(f"dataset {name} is not prepared: the TFDS data dir {root} does not exist; {command}")
    if not base.is_dir():
        raise InputError(f"dataset {name} is not prepared in {root} (no folder {base.name} there); {command}")
    versions = _prepared_versions(base) or _only_config_versions(base, name)
    if not versions:
        raise InputError(f"dataset {name} is not prepared in {root} ({base} has no complete version); {command}")
    if version is None:
        return versions[max(versions)]
    if version not in versions:
        found = ", ".join(directory.name for _, directory in sorted(versions.items()))
        raise InputError(f"dataset {name} is not prepared in {root} (prepared versions: {found}); {command}")
    return versions[version]


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(map(int, version.split(".")))


def _prepared_versions(directory: Path) -> dict[tuple[int, ...], Path]:
    """Version folders that TFDS finished writing (it writes into incomplete.* and renames)."""
    return {
        _version_key(info.parent.name): info.parent
        for info in directory.glob("*/dataset_info.json")
        if _VERSION.fullmatch(info.parent.name)
    }


def _only_config_versions(base: Path, name: str) -> dict[tuple[int, ...], Path]:
    """The prepared versions of the one config prepared under ``base`` (``name`` names none)."""
    configs = sorted(
        {info.parent.parent.name for info in base.glob("*/*/dataset_info.json") if _VERSION.fullmatch(info.parent.name)}
    )
    if len(configs) > 1:
        raise InputError(f"dataset {name}: name its config, one of {', '.join(f'{name}/{c}' for c in configs)}")
    return _prepared_versions(base / configs[0]) if configs else {}


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as error:
        raise InputError(f"{path} is missing: the dataset is not completely prepared") from error
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InputError(f"{path} is not JSON: {error}") from error


@dataclasses.dataclass(frozen=True)
class _Spec:
    """One feature as features.json describes it: its TFDS class, its settings (snake_case
    keys), and the features it holds (a Sequence's element as ``inner``, a FeaturesDict's by
    name as ``features``)."""

    kind: str
    settings: dict = dataclasses.field(default_factory=dict)
    inner: _Spec | None = None
    features: dict[str, _Spec] = dataclasses.field(default_factory=dict)

    def describe(self) -> str:
        return f"Sequence of {self.inner.describe()}" if self.kind == "Sequence" and self.inner else self.kind


# Keys of a feature's proto JSON beside its one settings message (FeaturesDict, Sequence, Image,
# ClassLabel, ...; tensorflow_datasets/core/proto/feature.proto).
_BESIDE_SETTINGS = frozenset({"pythonClassName", "description", "valueRange"})


def _spec(node: object, path: Path) -> _Spec:
    """A feature of features.json in either form TFDS wrote: since TFDS 4.5, a Feature proto as
    JSON ({"pythonClassName": ..., "featuresDict" | "sequence" | "image" | "classLabel" | ...:
    {...}}); before, {"type": "module.Class", "content": {...}}, the content of a FeaturesDict
    being {name: feature} and of a Sequence {"feature": feature, "length": n}, unless a
    "proto_cls" says it is a proto's JSON (possibly as a string)."""
    if not isinstance(node, dict):
        return _Spec("")
    proto = "type" not in node or "proto_cls" in node
    if "type" in node:
        kind, content = str(node["type"]), node.get("content")
        if isinstance(content, str):
            try:
                content = json.loads(content)
            except json.JSONDecodeError as error:
                raise InputError(f"{path}: the settings of a {kind} are not JSON: {error}") from error
    else:
        kind = str(node.get("pythonClassName", ""))
        content = next((v for k, v in node.items() if k not in _BESIDE_SETTINGS and isinstance(v, dict)), None)
    kind = kind.rpartition(".")[2]
    content = content if isinstance(content, dict) else {}
    if kind == "FeaturesDict":
        children = content.get("features", {}) if proto else content
        children = children if isinstance(children, dict) else {}
        return _Spec(kind, features={str(k): _spec(v, path) for k, v in children.items()})
    if kind == "Sequence":
        return _Spec(kind, {"length": content.get("length")}, inner=_spec(content.get("feature"), path))
    return _Spec(kind, {re.sub(r"([A-Z])", r"_\1", k).lower(): v for k, v in content.items()})


@dataclasses.dataclass(frozen=True)
class _Labels:
    """Where a dataset's labels are: the tf.train.Example feature, whether it lists the classes
    present (multi-label), and the class names."""

    key: str
    multi_label: bool
    class_names: list[str]


# The label layouts read, in order of preference: (the tf.train.Example key, multi-label, the
# ClassLabel's path in the FeaturesDict, the file TFDS writes its class names to). TFDS flattens
# nested features into "parent/child" keys (core/utils/py_utils.py, flatten_nest_dict); a
# Sequence's values are one flat list; a nested ClassLabel's names go to "parent-child.labels.txt"
# (core/features/feature.py, convert_feature_name_to_filename; class_label_feature.py,
# get_names_filepath).
_LAYOUTS = (
    ("label", False, ("label",), "label.labels.txt"),  # image classification
    ("labels", True, ("labels", "[]"), "labels.labels.txt"),  # voc: the classes present
    ("objects/label", True, ("objects", "[]", "label"), "objects-label.labels.txt"),  # coco, voc: each object's
)
_SHAPES = (
    "either a 'label' ClassLabel, a 'labels' Sequence of ClassLabel, "
    "or an 'objects' Sequence whose items have a 'label' ClassLabel"
)


def _find(specs: dict[str, _Spec], path: tuple[str, ...]) -> _Spec | None:
    """The feature at ``path`` ("[]": a Sequence's element), or None."""
    spec = _Spec("FeaturesDict", features=specs)
    for step in path:
        if step == "[]":
            spec = spec.inner if spec.kind == "Sequence" else None
        else:
            spec = spec.features.get(step) if spec.kind == "FeaturesDict" else None
        if spec is None:
            return None
    return spec


def _labels(directory: Path, dataset: str) -> _Labels:
    """The dataset's label layout, the first of ``_LAYOUTS`` it has; its class names as TFDS
    reads them: the ClassLabel's names in features.json (only its form before TFDS 4.5 has any),
    else its class-name file, else "0", "1", ..."""
    path = directory / "features.json"
    top = _spec(_read_json(path), path)
    specs = top.features if top.kind == "FeaturesDict" else {}
    image = specs.get("image")
    layout = next((layout for layout in _LAYOUTS if getattr(_find(specs, layout[2]), "kind", "") == "ClassLabel"), None)
    if image is None or image.kind != "Image" or layout is None:
        found = ", ".join(f"{key} ({spec.describe()})" for key, spec in specs.items())
        raise InputError(
            f"dataset {dataset} is not an image-classification dataset: it needs an 'image' Image feature "
            f"and {_SHAPES}; it has {found}"
        )
    dtype = str(image.settings.get("dtype", "uint8")).removeprefix("tf.")
    if dtype != "uint8":
        raise InputError(f"dataset {dataset}: its images are {dtype} arrays, not encoded 8-bit images")
    key, multi_label, where, names_file = layout
    label, names_path = _find(specs, where).settings, directory / names_file
    if label.get("names"):
        names = list(label["names"])
    elif names_path.is_file():
        names = [line.strip() for line in names_path.read_text().splitlines() if line.strip()]
    else:
        names = [str(i) for i in range(int(label.get("num_classes", 0)))]
    return _Labels(key, multi_label, names)


def _shards(directory: Path, dataset: str, info: dict, split: dict) -> list[_Shard]:
    file_format = info.get("fileFormat") or "tfrecord"
    if file_format not in _FORMATS:
        raise InputError(f"dataset {dataset} is stored as {file_format} files: only {' and '.join(_FORMATS)} are read")
    lengths = [int(n) for n in split.get("shardLengths", [])]
    if not lengths:
        raise InputError(f"dataset {dataset}: dataset_info.json lists no shards for split {split['name']}")
    template = split.get("filepathTemplate") or _DEFAULT_TEMPLATE
    paths = [directory / _shard_name(template, info, split["name"], i, len(lengths)) for i in range(len(lengths))]
    missing = [path for path in paths if not path.is_file()]
    if missing:
        raise InputError(
            f"dataset {dataset}: {len(missing)} of the {len(paths)} shard files of split {split['name']} are missing, "
            f"the first {missing[0]}; prepare the dataset again"
        )
    if file_format == "tfrecord":
        return [_TfrecordShard(path, size) for path, size in zip(paths, lengths, strict=True)]
    reader_class = _array_record_reader(dataset)
    return [_ArrayRecordShard(path, size, reader_class) for path, size in zip(paths, lengths, strict=True)]


def _shard_name(template: str, info: dict, split: str, index: int, count: int) -> str:
    """The file name TFDS gives shard ``index`` of ``count`` (numbers of at least 5 digits)."""
    digits = max(5, len(str(count)))
    shard, shards = f"{index:0{digits}d}", f"{count:0{digits}d}"
    try:
        return template.format(
            DATASET=info.get("name", ""),
            SPLIT=split,
            FILEFORMAT=info.get("fileFormat") or "tfrecord",
            SHARD_INDEX=shard,
            NUM_SHARDS=shards,
            SHARD_X_OF_Y=f"{shard}-of-{shards}",
        )
    except (KeyError, IndexError, ValueError) as error:
        raise InputError(f"dataset_info.json: cannot use the shard file name template {template!r}: {error}") from error


def _array_record_reader(dataset: str) -> type:
    try:
        from array_record.python.array_record_module import ArrayRecordReader
    except ImportError as error:
        raise InputError(
            f"dataset {dataset} is stored as array_record files, which need the array_record package: "
            "pip install array_record"
        ) from error
    return ArrayRecordReader
