"""Class names: ImageNet-1k's, shipped with the package (index = position in the sorted WordNet
ids, as in an ImageFolder of the validation set), the one rule for the names a model's classes
are shown and recorded under, and the classes a zero-shot model is asked to score (their names
and word vectors, read from the files a user gives)."""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Mapping, Sequence
from importlib import resources

import numpy as np

from tresnet_jax.data.labels_csv import read_class_file
from tresnet_jax.errors import InputError


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


def class_names(
    num_classes: int, own: Sequence[str] | None = None, from_data: Mapping[int, str] | None = None
) -> list[str]:
    """The names to show for a model's classes, the one rule every tool follows: the weights'
    own (``own``, when there is one a class); else the data's, by model class (``from_data``);
    else ImageNet's for a 1000-class model ("tench (n01440764)"); else "class i"."""
    if own is not None and len(own) == num_classes:
        return [str(name) for name in own]
    if num_classes == len(imagenet_classes()) and not from_data:
        return [f"{names.split(',')[0]} ({wnid})" for wnid, names in imagenet_classes()]
    return [str((from_data or {}).get(i, f"class {i}")) for i in range(num_classes)]


def names_to_record(data_names: Sequence[str], num_classes: int) -> list[str] | None:
    """The class names a trained model's metadata keeps: its training set's, unless they are
    ImageNet's WordNet ids in a 1000-class model (ImageNet's names apply) or their count differs."""
    names = [str(name) for name in data_names]
    if len(names) != num_classes or (num_classes == len(imagenet_classes()) and set(names) <= set(imagenet_index())):
        return None
    return names


KINDS = {True: "multi-label (several classes an image)", False: "single-label (one class an image)"}


def check_label_kind(
    source_name: str, source_multi_label: bool, multi_label: bool, model: str, remedy: Mapping[bool, str]
) -> None:
    """One line, before anything is compiled or written, when a dataset and the model disagree
    on whether an image has one class or several; ``model`` names what makes the model's kind,
    with its verb ("these weights are", "--loss asl is"), ``remedy`` what to do, by that kind."""
    if source_multi_label != multi_label:
        raise InputError(
            f"{model} {KINDS[multi_label]} but {source_name} is {KINDS[source_multi_label]}: {remedy[multi_label]}"
        )


@dataclasses.dataclass(frozen=True)
class ZeroShotClasses:
    """The classes a zero-shot model scores: their names and a word vector each, row i the
    vector of ``names[i]``; the model gives one logit a row, in this order."""

    names: tuple[str, ...]
    embeddings: np.ndarray  # float32 (classes, width)


def read_zero_shot_classes(
    names_file: str | os.PathLike, embeddings_file: str | os.PathLike, width: int
) -> ZeroShotClasses:
    """The names of ``names_file`` (one a line, ``--classes``) and the word vectors of
    ``embeddings_file`` (``--class-embeddings``: a float .npy array of one ``width``-wide row a
    name), each refused in one line when it cannot be what it should."""
    names = read_class_file(names_file)
    embeddings = read_class_embeddings(embeddings_file, width)
    if len(embeddings) != len(names):
        raise InputError(
            f"{embeddings_file}: {len(embeddings)} word vectors for the {len(names)} classes of {names_file}; "
            "expected one a class, in its order"
        )
    return ZeroShotClasses(tuple(names), embeddings)


def read_class_embeddings(path: str | os.PathLike, width: int) -> np.ndarray:
    """A .npy file of word vectors, (classes, ``width``) floats, as float32. Never unpickled: a
    file that needs pickle is refused, as is an .npz archive, another shape or a non-finite value."""
    try:
        array = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except OSError as err:
        raise InputError(f"{path}: {err.strerror or err}") from None
    except (ValueError, EOFError) as err:  # pickled, truncated or not a NumPy file at all
        reason = (str(err).strip().splitlines() or ["unreadable"])[0]
        raise InputError(f"{path}: not a NumPy .npy array of word vectors ({reason})") from None
    if not isinstance(array, np.ndarray):  # an .npz archive
        array.close()
        raise InputError(f"{path}: an .npz archive; expected one .npy array of shape (classes, {width})")
    if array.dtype.kind != "f":
        raise InputError(f"{path}: {array.dtype} values; expected floating-point word vectors")
    if array.ndim != 2 or array.shape[1] != width or len(array) == 0:
        raise InputError(
            f"{path}: shape {array.shape}; expected (classes, {width}): a {width}-wide word vector a class"
        )
    if not np.isfinite(array).all():
        raise InputError(f"{path}: holds NaN or infinite values")
    return array.astype(np.float32)


def check_zero_shot_input(zero_shot: bool, given: bool, weights: str) -> None:
    """One line when class embeddings are missing for a zero-shot model (it has no classes of
    its own to score) or given to a model with classes of its own; ``weights`` names them as
    the subject of a sentence ("these weights (...)")."""
    if zero_shot and not given:
        raise InputError(
            f"{weights} are a zero-shot ML-Decoder, which scores the classes it is given: pass their word vectors "
            "(--class-embeddings FILE.npy) and names (--classes FILE)"
        )
    if given and not zero_shot:
        raise InputError(f"--class-embeddings are the input of a zero-shot ML-Decoder; {weights} score their own")
