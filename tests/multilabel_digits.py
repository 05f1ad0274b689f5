"""A multi-label image set for the tests: 1 to 3 distinct handwritten digits (scikit-learn's)
on a 32x32 canvas, one in each of up to three of its four 16x16 quarters; an image's classes are
the digits it shows. Written as PNG files listed in image,labels CSVs (train.py --train-labels)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

CANVAS = 32
CELL = 16
CLASS_NAMES = [f"digit{d}" for d in range(10)]


def write_canvases(root: Path, train_images: int = 1200, val_images: int = 300, seed: int = 0) -> tuple[Path, Path]:
    """``root/train.csv`` and ``root/val.csv`` with their images under ``root/images``; the two
    sets draw from disjoint halves of the digits, so validation shows handwriting never trained on."""
    data = load_digits()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(data.images))
    pools = {"train": order[: len(order) * 3 // 4], "val": order[len(order) * 3 // 4 :]}
    (root / "images").mkdir(parents=True)
    paths = {}
    for split, count in (("train", train_images), ("val", val_images)):
        rows = [canvas_row(root, f"{split}{k:05d}.png", data, pools[split], rng) for k in range(count)]
        paths[split] = root / f"{split}.csv"
        with open(paths[split], "w", newline="") as file:
            writer = csv.writer(file)
            writer.writerow(["image", "labels"])
            writer.writerows(rows)
    return paths["train"], paths["val"]


def canvas_row(root: Path, name: str, data, pool: np.ndarray, rng: np.random.Generator) -> list[str]:
    """Draw one canvas, write it, and return its CSV row."""
    pixels = np.zeros((CANVAS, CANVAS), np.uint8)
    shown: set[int] = set()
    cells = rng.permutation(4)[: rng.integers(1, 4)]
    for cell in cells:
        index = rng.choice(pool)
        while int(data.target[index]) in shown:  # distinct classes: each digit appears once
            index = rng.choice(pool)
        shown.add(int(data.target[index]))
        digit = Image.fromarray((data.images[index] * (255 / 16)).astype(np.uint8)).resize((CELL, CELL), Image.BILINEAR)
        top, left = divmod(int(cell), 2)
        pixels[top * CELL : (top + 1) * CELL, left * CELL : (left + 1) * CELL] = np.asarray(digit)
    Image.fromarray(pixels).convert("RGB").save(root / "images" / name)
    return [f"images/{name}", " ".join(CLASS_NAMES[d] for d in sorted(shown))]
