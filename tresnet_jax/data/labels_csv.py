"""Multi-label images listed in a CSV, as the authors' ASL repository trains TResNet on them.

The format (``--train-labels``, ``--val-labels``)::

    image,labels
    photos/0001.jpg,person dog
    "photos/with, comma.jpg",cat
    photos/0003.jpg,

``labels`` are class names separated by spaces, possibly none (an image with no positive
class); image paths are relative to the CSV's folder, or absolute. The classes are the sorted
names the CSVs use (``classes_in`` over the training and validation CSVs together, so both get
one class list), or the names of a class file in its order (``read_class_file``, ``--classes``).

A missing image is no error when the CSV is read: ``record`` raises ``UnreadableImage`` for it,
and evaluation and training skip, name and count it as they do for a folder's.
"""

from __future__ import annotations

import codecs
import csv
import dataclasses
import difflib
import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from tresnet_jax.errors import InputError, UnreadableImage

HEADER = ("image", "labels")


def _read_text(path: Path) -> str:
    """A file's text (UTF-8, a leading byte-order mark dropped), or InputError saying why not."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except OSError as err:
        raise InputError(f"{path}: {err.strerror or err}") from None
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8) :]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise InputError(
            f"{path}:{line}: not UTF-8 text (byte 0x{data[err.start]:02x}); save the file as UTF-8"
        ) from None


def read_class_file(path: str | os.PathLike) -> list[str]:
    """The class names of a file, one a line in its order (``--classes``): surrounding
    whitespace stripped, blank lines skipped."""
    path = Path(path).expanduser()
    names: list[str] = []
    first_line: dict[str, int] = {}
    for number, line in enumerate(_read_text(path).split("\n"), 1):
        name = line.strip()
        if not name:
            continue
        if len(name.split()) > 1:
            raise InputError(
                f"{path}:{number}: class name {name!r} contains whitespace; a CSV's labels are separated by "
                "spaces, so it could never be given"
            )
        if name in first_line:
            raise InputError(f"{path}:{number}: class {name!r} is listed twice (first on line {first_line[name]})")
        first_line[name] = number
        names.append(name)
    if not names:
        raise InputError(f"{path}: no class names (expected one a line)")
    return names


class _Row(NamedTuple):
    line: int  # where the row starts in the CSV (a quoted field may span lines)
    image: str  # the path as resolved: relative to the CSV's folder, or absolute
    names: tuple[str, ...]  # the classes present, sorted, each once


def _read_rows(csv_path: Path) -> list[_Row]:
    """The rows of a labels CSV, checked for everything but the class list."""
    reader = csv.reader(io.StringIO(_read_text(csv_path), newline=""))
    rows: list[_Row] = []
    seen: dict[str, int] = {}  # image -> its line
    header_seen = False
    next_start = 1
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            break
        except csv.Error as err:
            raise InputError(f"{csv_path}:{reader.line_num}: not a readable CSV row ({err})") from None
        start, next_start = next_start, reader.line_num + 1
        if not fields or (len(fields) == 1 and not fields[0].strip()):
            continue  # a blank line
        if not header_seen:
            if tuple(field.strip() for field in fields) != HEADER:
                raise InputError(
                    f"{csv_path}:{start}: the header must be {','.join(HEADER)}, found {','.join(fields)!r}"
                )
            header_seen = True
            continue
        if len(fields) != len(HEADER):
            raise InputError(
                f"{csv_path}:{start}: {len(fields)} fields, expected {len(HEADER)} ({','.join(HEADER)}); "
                "quote an image path that holds a comma"
            )
        image = fields[0].strip()
        if not image:
            raise InputError(f"{csv_path}:{start}: empty image path")
        resolved = os.path.normpath(csv_path.parent / image)
        if resolved in seen:
            raise InputError(
                f"{csv_path}:{start}: image {image!r} is listed again (first on line {seen[resolved]}); "
                "each image must appear once"
            )
        seen[resolved] = start
        rows.append(_Row(start, resolved, tuple(sorted(set(fields[1].split())))))
    if not header_seen:
        raise InputError(f"{csv_path}: empty; expected the header {','.join(HEADER)} and a row per image")
    if not rows:
        raise InputError(f"{csv_path}: no images after the header {','.join(HEADER)}")
    return rows


def _no_classes(where: str) -> InputError:
    return InputError(
        f"{where}: no row names a class (labels are class names separated by spaces); cannot train on zero classes"
    )


def classes_in(csv_paths: Sequence[str | os.PathLike]) -> list[str]:
    """The sorted union of the class names the CSVs use: one class list for a training and a
    validation CSV."""
    paths = [Path(path).expanduser() for path in csv_paths]
    names = {name for path in paths for row in _read_rows(path) for name in row.names}
    if not names:
        raise _no_classes(", ".join(str(path) for path in paths) or "no labels CSV")
    return sorted(names)


@dataclasses.dataclass
class CsvSource:
    """The images of a labels CSV in its row order, each labelled with the classes present
    (sorted indices of ``class_names``, possibly none)."""

    csv_path: Path
    class_names: list[str]
    files: list[str]
    labels: list[tuple[int, ...]]
    multi_label = True

    @classmethod
    def read(
        cls,
        csv_path: str | os.PathLike,
        class_names: Sequence[str] | None = None,
        classes_from: str | None = None,
    ) -> CsvSource:
        """The CSV's images and labels in ``class_names`` (default: the sorted names this CSV
        uses); ``classes_from`` says where the names came from, for messages."""
        csv_path = Path(csv_path).expanduser()
        rows = _read_rows(csv_path)
        if class_names is None:
            class_names = sorted({name for row in rows for name in row.names})
            if not class_names:
                raise _no_classes(str(csv_path))
        class_names = list(class_names)
        where = classes_from or "the given class list"
        index = {name: i for i, name in enumerate(class_names)}
        if not class_names:
            raise InputError(f"{where}: no class names")
        if len(index) != len(class_names):
            raise InputError(f"{where}: {len(class_names)} class names, {len(index)} distinct; expected distinct names")
        labels = []
        for row in rows:
            for name in row.names:
                if name not in index:
                    close = difflib.get_close_matches(name, class_names, n=3)
                    hint = f"; closest: {', '.join(close)}" if close else ""
                    raise InputError(
                        f"{csv_path}:{row.line}: unknown class {name!r}, not among the {len(class_names)} "
                        f"classes of {where}{hint}"
                    )
            labels.append(tuple(sorted(index[name] for name in row.names)))
        return cls(csv_path, class_names, [row.image for row in rows], labels)

    @property
    def name(self) -> str:
        return str(self.csv_path)

    def __len__(self) -> int:
        return len(self.files)

    def record(self, index: int) -> tuple[bytes, tuple[int, ...]]:
        path = self.files[index]
        try:
            return Path(path).read_bytes(), self.labels[index]
        except FileNotFoundError:
            raise UnreadableImage(path, "no such file") from None
        except OSError as err:
            raise UnreadableImage(path, err.strerror or str(err)) from None

    def describe(self, index: int) -> str:
        return self.files[index]
