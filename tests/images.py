"""Small labelled image sets made on the fly: real photographs shipped with scikit-image and
generated images, as JPEG and PNG of many sizes and colour modes."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import skimage.data
from PIL import Image

# Colour and greyscale photographs of various sizes and aspect ratios.
PHOTOS = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "camera",
    "moon",
    "brick",
    "grass",
    "gravel",
    "page",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "text",
)
CLASSES = ("n01440764", "n01443537", "n01484850", "n01491361", "n01494475", "n01496331", "n01498041", "n01514668")


def photo(name: str) -> np.ndarray:
    image = getattr(skimage.data, name)()
    return image[..., :3] if image.ndim == 3 else image


def photo_files(directory: Path) -> list[Path]:
    """The photographs saved as JPEG (quality 90) and PNG."""
    directory.mkdir(parents=True, exist_ok=True)
    files = []
    for name in PHOTOS:
        image = Image.fromarray(photo(name))
        for suffix, options in ((".jpg", {"quality": 90}), (".png", {})):
            path = directory / f"{name}{suffix}"
            image.save(path, **options)
            files.append(path)
    return files


def generated(seed: int, height: int, width: int) -> np.ndarray:
    """A smooth colour pattern with noise: not a photograph, but not white noise either."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    phase = rng.uniform(0, 2 * math.pi, 3)
    freq = rng.uniform(2, 9, 3)
    channels = [np.sin(freq[c] * (x + y * (c + 1)) * math.pi + phase[c]) for c in range(3)]
    image = 127.5 + 100 * np.stack(channels, -1) + rng.normal(0, 12, (height, width, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def image_folder(root: Path, with_corrupt: bool = True) -> Path:
    """root/<wnid>/<image>: 5 ImageNet classes, photographs and generated images in JPEG and PNG,
    greyscale, CMYK and RGBA files, sizes from 40x56 to 512x768, and (optionally) one corrupt
    file, ``n01440764/corrupt.jpg``."""
    sizes = [(40, 56), (300, 200), (257, 513), (128, 128), (96, 160)]
    for i, name in enumerate(PHOTOS[:10]):
        folder = root / CLASSES[i % len(CLASSES)]
        folder.mkdir(parents=True, exist_ok=True)
        image = Image.fromarray(photo(name))
        if i % 2:
            image.save(folder / f"{name}.jpg", quality=90)
        else:
            image.save(folder / f"{name}.png")
    for i, (height, width) in enumerate(sizes * 2):
        folder = root / CLASSES[(i + 2) % len(CLASSES)]
        image = Image.fromarray(generated(i, height, width))
        if i == 3:
            image.convert("CMYK").save(folder / f"generated{i}.jpg", quality=92)
        elif i == 4:
            image.convert("L").save(folder / f"generated{i}.jpg", quality=92)
        elif i == 5:
            image.convert("RGBA").save(folder / f"generated{i}.png")
        elif i % 2:
            image.save(folder / f"generated{i}.png")
        else:
            image.save(folder / f"generated{i}.jpg", quality=88)
    if with_corrupt:
        good = (root / CLASSES[1] / "chelsea.jpg").read_bytes()
        (root / CLASSES[0] / "corrupt.jpg").write_bytes(good[: len(good) // 3])
    return root
