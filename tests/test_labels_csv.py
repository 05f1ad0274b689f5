"""Multi-label CSV sources (image,labels): rows, classes, class files, each refusal with its
message and line, and a missing image skipped by evaluation's reader as a folder's would be."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from PIL import Image

from tresnet_jax.data.host_pool import ordered_map
from tresnet_jax.data.labels_csv import CsvSource, classes_in, read_class_file
from tresnet_jax.data.pipeline import Read, eval_keys
from tresnet_jax.data.preprocess import EvalTransform
from tresnet_jax.errors import InputError, UnreadableImage
from tresnet_jax.preprocessing import Preprocessing


def image(path, seed=0):
    """A tiny PNG or JPEG (by the path's suffix) at ``path``; its bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (12, 16, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, **({"quality": 90} if path.suffix == ".jpg" else {}))
    return path.read_bytes()


def write(path, text, encoding="utf-8"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode(encoding))
    return path


def refusal(fn, *args, **kwargs) -> str:
    with pytest.raises(InputError) as caught:
        fn(*args, **kwargs)
    return str(caught.value)


def test_rows_round_trip_quoted_empty_doubled_absolute_and_relative(tmp_path):
    data = tmp_path / "data"
    elsewhere = tmp_path / "elsewhere" / "b.png"
    encoded = {
        "a.jpg": image(data / "images" / "a.jpg", 1),
        "with, comma.png": image(data / "images" / "with, comma.png", 2),
        "none.png": image(data / "none.png", 3),
        "abs": image(elsewhere, 4),
    }
    csv_path = write(
        data / "labels.csv",
        "image,labels\n"
        "images/a.jpg,person dog\n"
        '"images/with, comma.png","cat cat  dog"\n'
        "none.png,\n"
        f"{elsewhere},person\n",
    )
    source = CsvSource.read(csv_path)
    assert source.multi_label is True
    assert CsvSource.multi_label is True
    assert source.name == str(csv_path)
    assert source.class_names == ["cat", "dog", "person"]
    assert len(source) == 4
    assert source.files == [
        str(data / "images" / "a.jpg"),
        str(data / "images" / "with, comma.png"),
        str(data / "none.png"),
        str(elsewhere),
    ]
    # Sorted indices, a class doubled in a row counted once, an empty label an empty tuple.
    assert source.labels == [(1, 2), (0, 1), (), (2,)]
    records = [source.record(i) for i in range(len(source))]
    assert records == [
        (encoded["a.jpg"], (1, 2)),
        (encoded["with, comma.png"], (0, 1)),
        (encoded["none.png"], ()),
        (encoded["abs"], (2,)),
    ]
    assert [source.describe(i) for i in range(len(source))] == source.files
    # Worker processes are given the source by pickling it.
    assert pickle.loads(pickle.dumps(source)) == source


def test_classes_are_sorted_and_labels_follow_them(tmp_path):
    image(tmp_path / "x.png")
    csv_path = write(tmp_path / "l.csv", "image,labels\r\nx.png,zebra apple mango\r\n")  # CRLF too
    source = CsvSource.read(csv_path)
    assert source.class_names == ["apple", "mango", "zebra"]
    assert source.labels == [(0, 1, 2)]


def test_relative_csv_path_blank_lines_and_dot_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    image(tmp_path / "sub" / "x.png")
    write(tmp_path / "sub" / "l.csv", "\nimage,labels\n\n./x.png,a\n\n")
    source = CsvSource.read("sub/l.csv")
    assert source.files == ["sub/x.png"]
    assert source.record(0)[1] == (0,)


def test_classes_in_two_csvs_give_both_one_class_list(tmp_path):
    train = write(tmp_path / "train.csv", "image,labels\na.png,dog cat\nb.png,\n")
    val = write(tmp_path / "val.csv", "image,labels\nc.png,bird dog\n")
    assert classes_in([train, val]) == ["bird", "cat", "dog"]
    classes = classes_in([str(train), str(val)])
    assert CsvSource.read(train, classes).labels == [(1, 2), ()]
    assert CsvSource.read(val, classes).labels == [(0, 2)]
    # Alone, each CSV would have its own list.
    assert CsvSource.read(val).class_names == ["bird", "dog"]


def test_class_file_keeps_its_order(tmp_path):
    names = write(tmp_path / "classes.txt", "\ufeffzebra\n  apple \r\n\n\t\nmango\n")
    assert read_class_file(names) == ["zebra", "apple", "mango"]
    csv_path = write(tmp_path / "l.csv", "image,labels\nx.png,mango zebra\ny.png,apple\n")
    source = CsvSource.read(csv_path, read_class_file(names), classes_from=str(names))
    assert source.class_names == ["zebra", "apple", "mango"]
    assert source.labels == [(0, 2), (1,)]


def test_class_file_refusals(tmp_path):
    missing = tmp_path / "missing.txt"
    assert refusal(read_class_file, missing) == f"{missing}: no such file"
    assert refusal(read_class_file, tmp_path) == f"{tmp_path}: Is a directory"
    latin = write(tmp_path / "latin.txt", "cat\ncafé\n", "latin-1")
    assert refusal(read_class_file, latin) == f"{latin}:2: not UTF-8 text (byte 0xe9); save the file as UTF-8"
    empty = write(tmp_path / "empty.txt", "\n  \n")
    assert refusal(read_class_file, empty) == f"{empty}: no class names (expected one a line)"
    doubled = write(tmp_path / "doubled.txt", "cat\ndog\n\n cat\n")
    assert refusal(read_class_file, doubled) == f"{doubled}:4: class 'cat' is listed twice (first on line 1)"
    spaced = write(tmp_path / "spaced.txt", "cat\nhot dog\n")
    assert refusal(read_class_file, spaced) == (
        f"{spaced}:2: class name 'hot dog' contains whitespace; a CSV's labels are separated by spaces, "
        "so it could never be given"
    )


def test_unknown_class_names_the_line_the_list_and_the_closest_names(tmp_path):
    names = write(tmp_path / "classes.txt", "person\ndog\ncat\nbicycle\n")
    csv_path = write(tmp_path / "l.csv", "image,labels\na.png,dog\nb.png,cat persn\n")
    classes = read_class_file(names)
    assert refusal(CsvSource.read, csv_path, classes, classes_from=str(names)) == (
        f"{csv_path}:3: unknown class 'persn', not among the 4 classes of {names}; closest: person"
    )
    far = write(tmp_path / "far.csv", "image,labels\na.png,xyzzy\n")
    assert refusal(CsvSource.read, far, classes) == (
        f"{far}:2: unknown class 'xyzzy', not among the 4 classes of the given class list"
    )


def test_csv_refusals(tmp_path):
    missing = tmp_path / "missing.csv"
    assert refusal(CsvSource.read, missing) == f"{missing}: no such file"
    assert refusal(classes_in, [missing]) == f"{missing}: no such file"

    empty = write(tmp_path / "empty.csv", "")
    assert refusal(CsvSource.read, empty) == (f"{empty}: empty; expected the header image,labels and a row per image")
    header_only = write(tmp_path / "header_only.csv", "image,labels\n\n")
    assert refusal(CsvSource.read, header_only) == f"{header_only}: no images after the header image,labels"

    no_header = write(tmp_path / "no_header.csv", "a.png,cat\n")
    assert refusal(CsvSource.read, no_header) == (f"{no_header}:1: the header must be image,labels, found 'a.png,cat'")
    wrong_header = write(tmp_path / "wrong_header.csv", "\nfile,tags\na.png,cat\n")
    assert refusal(CsvSource.read, wrong_header) == (
        f"{wrong_header}:2: the header must be image,labels, found 'file,tags'"
    )

    fields = write(tmp_path / "fields.csv", "image,labels\na.png,cat\nb, c.png,dog\n")
    assert refusal(CsvSource.read, fields) == (
        f"{fields}:3: 3 fields, expected 2 (image,labels); quote an image path that holds a comma"
    )
    one_field = write(tmp_path / "one_field.csv", "image,labels\na.png\n")
    assert refusal(CsvSource.read, one_field).startswith(f"{one_field}:2: 1 fields, expected 2")

    no_path = write(tmp_path / "no_path.csv", "image,labels\na.png,cat\n  ,dog\n")
    assert refusal(CsvSource.read, no_path) == f"{no_path}:3: empty image path"

    # The second row's quoted path spans two lines: the next row starts on line 5.
    doubled = write(tmp_path / "doubled.csv", 'image,labels\na.png,cat\n"b\n.png",dog\n./a.png,dog\n')
    assert refusal(CsvSource.read, doubled) == (
        f"{doubled}:5: image './a.png' is listed again (first on line 2); each image must appear once"
    )

    latin = write(tmp_path / "latin.csv", "image,labels\na.png,cat\nb.png,café\n", "latin-1")
    assert refusal(CsvSource.read, latin) == f"{latin}:3: not UTF-8 text (byte 0xe9); save the file as UTF-8"


def test_no_class_at_all_is_refused_without_a_class_list(tmp_path):
    unlabelled = write(tmp_path / "unlabelled.csv", "image,labels\na.png,\nb.png,  \n")
    zero = "no row names a class (labels are class names separated by spaces); cannot train on zero classes"
    assert refusal(CsvSource.read, unlabelled) == f"{unlabelled}: {zero}"
    other = write(tmp_path / "other.csv", "image,labels\nc.png,\n")
    assert refusal(classes_in, [unlabelled, other]) == f"{unlabelled}, {other}: {zero}"
    # With a class list, images without a positive class are fine.
    assert CsvSource.read(unlabelled, ["cat"]).labels == [(), ()]


def test_a_missing_image_is_no_error_until_it_is_read(tmp_path):
    image(tmp_path / "here.png")
    csv_path = write(tmp_path / "l.csv", "image,labels\nhere.png,cat\ngone.jpg,dog\n")
    source = CsvSource.read(csv_path)
    assert source.record(0)[1] == (0,)
    with pytest.raises(UnreadableImage) as caught:
        source.record(1)
    gone = str(tmp_path / "gone.jpg")
    assert (caught.value.name, caught.value.reason) == (gone, "no such file")
    assert str(caught.value) == f"{gone}: no such file"


@pytest.mark.parametrize("processes", [False, True])
def test_evaluations_reader_skips_and_names_a_missing_image(tmp_path, processes):
    """What evaluation and the training stream do with an image that cannot be read: reported
    with its reason and its index (which ``describe`` names), the rest read in order."""
    image(tmp_path / "a.png", 1)
    image(tmp_path / "c.jpg", 2)
    write(tmp_path / "broken.png", "not an image")
    csv_path = write(tmp_path / "l.csv", "image,labels\na.png,cat\ngone.png,dog\nbroken.png,cat\nc.jpg,\n")
    source = CsvSource.read(csv_path)
    read = Read(source, EvalTransform(Preprocessing(32)))
    outcomes = list(ordered_map(read, eval_keys(0, len(source)), 2, 4, processes))
    assert [o.item[1] for o in outcomes] == [0, 1, 2, 3]
    assert outcomes[1].error == "no such file"
    assert source.describe(1) == str(tmp_path / "gone.png")
    assert outcomes[2].error.startswith("unreadable image (")
    assert [(o.value[0].shape, o.value[1]) for o in (outcomes[0], outcomes[3])] == [
        ((32, 32, 3), (0,)),
        ((32, 32, 3), ()),
    ]


def test_evaluation_batches_skip_the_missing_image_and_keep_the_others_labels(tmp_path):
    """``preprocessed_batches`` over a CSV source: the missing image in ``skipped`` (index ->
    reason; ``describe`` names it), the others batched in order with their multi-hot rows.
    (Imported here: the label map is the newest part of the multi-label interface.)"""
    from tresnet_jax.data.sources import model_labels
    from tresnet_jax.evaluation import preprocessed_batches

    image(tmp_path / "a.png", 1)
    image(tmp_path / "c.jpg", 2)
    image(tmp_path / "d.png", 3)
    csv_path = write(tmp_path / "l.csv", "image,labels\na.png,cat dog\ngone.png,dog\nc.jpg,\nd.png,dog\n")
    source = CsvSource.read(csv_path)
    label_map = model_labels(source, len(source.class_names))
    np.testing.assert_array_equal(label_map.classes, np.arange(2))
    skipped: dict[int, str] = {}
    batches = list(preprocessed_batches(source, Preprocessing(32), 0, len(source), label_map, 2, 3, skipped, workers=2))
    assert skipped == {1: "no such file"}
    assert source.describe(1) == str(tmp_path / "gone.png")
    assert [batch["index"].tolist() for batch in batches] == [[0, 2], [3, -1], [-1, -1]]
    assert [batch["mask"].tolist() for batch in batches] == [[True, True], [True, False], [False, False]]
    assert [batch["label"].tolist() for batch in batches] == [[[1, 1], [0, 0]], [[0, 1], [0, 0]], [[0, 0], [0, 0]]]
