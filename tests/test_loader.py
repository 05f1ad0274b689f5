"""The host input pool: threads and processes give the same rows in the same order, and an
unreadable image is reported, not fatal, in both."""

import pickle
import sys
import types

import numpy as np
import pytest

from tests.images import photo_files
from tests.tfds_folders import prepare_from_folders
from tresnet_jax.data.augment import AugmentConfig
from tresnet_jax.data.host_pool import ordered_map, server_preload
from tresnet_jax.data.pipeline import Read, eval_keys
from tresnet_jax.data.preprocess import EvalTransform
from tresnet_jax.data.sources import FolderSource
from tresnet_jax.data.tfds_reader import open_split
from tresnet_jax.data.train_stream import TrainTransform
from tresnet_jax.errors import UnreadableImage
from tresnet_jax.preprocessing import Preprocessing


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    for i, path in enumerate(photo_files(root / "source")[:6]):
        (root / "images" / f"class{i % 2}").mkdir(parents=True, exist_ok=True)
        (root / "images" / f"class{i % 2}" / path.name).write_bytes(path.read_bytes())
    (root / "images" / "class1" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a JPEG")
    return root / "images"


def rows(fn, items, processes):
    return [(o.item, o.error) if o.error else (o.item, o.value) for o in ordered_map(fn, items, 2, 4, processes)]


def assert_same(a, b):
    assert [item for item, _ in a] == [item for item, _ in b]
    for (_, x), (_, y) in zip(a, b, strict=True):
        if isinstance(x, str):
            assert x == y
        else:  # (row, label, key used, images passed over)
            np.testing.assert_array_equal(x[0], y[0])
            assert x[1:] == y[1:]


def test_processes_and_threads_give_the_same_preprocessed_rows(folder):
    source = FolderSource.scan(folder)
    fn = Read(source, EvalTransform(Preprocessing(96)))
    keys = list(eval_keys(0, len(source)))
    threads, processes = rows(fn, keys, False), rows(fn, keys, True)
    assert_same(threads, processes)
    broken = source.files.index(str(folder / "class1" / "broken.jpg"))
    assert threads[broken][1].startswith("unreadable image (")  # the reason; reports name the file
    error = UnreadableImage(source.files[broken], threads[broken][1])
    assert str(pickle.loads(pickle.dumps(error))) == f"{source.files[broken]}: {threads[broken][1]}"
    assert sum(isinstance(value, str) for _, value in threads) == 1


def test_processes_and_threads_give_the_same_augmented_examples(folder):
    source = FolderSource.scan(folder)
    fn = Read(source, TrainTransform(AugmentConfig(image_size=64), seed=5), replace=True)
    items = [(epoch, index) for epoch in range(2) for index in range(len(source))]
    assert_same(rows(fn, items, False), rows(fn, items, True))


def test_a_tfds_split_is_read_the_same_in_worker_processes(folder, tmp_path):
    """A split holds open files and locks; pickled for a worker, it opens its shards again."""
    name = prepare_from_folders("PoolImages", tmp_path, {"validation": folder}, num_shards=2)
    split = open_split(f"{name}:validation", str(tmp_path))
    split.record(0)  # opens and indexes the first shard here
    copy = pickle.loads(pickle.dumps(split))
    assert [copy.record(i) for i in range(len(split))] == [split.record(i) for i in range(len(split))]
    fn = Read(split, EvalTransform(Preprocessing(64)))
    keys = list(eval_keys(0, len(split)))
    assert_same(rows(fn, keys, False), rows(fn, keys, True))


def test_the_fork_server_preloads_the_function_s_module_and_the_main_script_s_imports(monkeypatch):
    main = types.ModuleType("__main__")
    main.np, main.AugmentConfig, main.count = np, AugmentConfig, 3
    monkeypatch.setitem(sys.modules, "__main__", main)
    fn = Read(None, EvalTransform(Preprocessing(64)))
    assert server_preload(fn) == ["tresnet_jax.data.pipeline"]  # a notebook: workers do not run it again
    main.__file__ = "eval.py"
    assert server_preload(fn) == ["numpy", "tresnet_jax.data.augment", "tresnet_jax.data.pipeline"]
