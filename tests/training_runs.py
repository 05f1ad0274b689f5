"""What the training tests share: the digits data set, the tiny run that several of them repeat,
and how they read a run's results."""

import json
import shutil
from pathlib import Path

import jax
import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

from tests import tiny_model
from tresnet_jax.weights.storage import read_variables

SIZE = 32
VAL_IMAGES = 400


def write_digits(root: Path) -> Path:
    """scikit-learn's 1797 handwritten digits (8x8) as PNG folders under ``root``, upscaled to
    32x32: 1397 in train/ to train on, 400 in val/ held out."""
    data = load_digits()
    order = np.random.default_rng(0).permutation(len(data.images))
    for k, i in enumerate(order):
        folder = root / ("val" if k < VAL_IMAGES else "train") / f"digit{data.target[i]}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (data.images[i] * (255 / 16)).astype(np.uint8)
        Image.fromarray(pixels).resize((SIZE, SIZE), Image.BILINEAR).convert("RGB").save(folder / f"{i}.png")
    return root


def metrics(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def final_weights(workdir: Path, name: str = "weights") -> dict:
    return read_variables(workdir / name)


def assert_trees_equal(a, b, rtol=0.0, atol=0.0):
    flat_a, flat_b = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
    for (path, x), (_, y) in zip(flat_a, flat_b, strict=True):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path))


def subset(folder: Path, per_class: int, target: Path) -> Path:
    """The first ``per_class`` images of each class folder, copied under ``target``."""
    for class_folder in sorted(folder.iterdir()):
        (target / class_folder.name).mkdir(parents=True)
        for image in sorted(class_folder.iterdir())[:per_class]:
            shutil.copy(image, target / class_folder.name)
    return target


# The tiny run: tresnet_tiny (tests/tiny_model.py), 4 steps of batch 8 at 32 px on one device,
# checkpoints at steps 2 and 4, augmented on the device (the GPU's default path: the resume,
# device-count and multi-process tests hold it to their promises; the host path's are
# tests/test_train_data.py's). Its training and evaluation steps are compiled once a test run:
# every process the tests start has the test process's XLA_FLAGS (conftest.py), which the
# persistent compilation cache's key holds, so a run on the same settings and any data in
# another test or process reads them back.
TINY = [
    "--augment",
    "device",
    "--num-devices",
    1,
    "--model",
    tiny_model.NAME,
    "--image-size",
    SIZE,
    "--batch-size",
    8,
    "--max-steps",
    4,
    "--checkpoint-every",
    2,
    "--log-every",
    1,
    "--lr",
    0.05,
    "--eval-every",
    0,
    "--no-progress",
]


def tiny_args(digits, workdir, *extra):
    return [str(a) for a in [*TINY, "--train_dir", digits / "train", "--workdir", workdir, *extra]]


def train_command(digits, workdir, *extra) -> list[str]:
    """The tiny run's command line, in a process of its own."""
    return tiny_model.train_py(tiny_args(digits, workdir, *extra))
