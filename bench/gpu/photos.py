"""Photographs for the numerical checks of ``bench/gpu/gpu_suite.py``, with nothing but PIL.

Reduced precision is judged on real photographs, whose statistics random pixels do not have.
The suite takes them from a folder (``--photos DIR``), else from scikit-image's sample
photographs when scikit-image is installed, else from the four the notebook ships
(``notebooks/images``), else it generates images; it says which. A machine without
scikit-image (the lent GPU machines) gets all twelve from a folder written here:

    python -m bench.gpu.photos runs/photos     # scikit-image's photographs as JPEG, about 0.4 MB
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

# scikit-image's colour and greyscale sample photographs.
SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "camera", "moon", "brick", "grass", "gravel",
                  "hubble_deep_field", "immunohistochemistry", "retina")  # fmt: skip
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
WRITTEN_SIDE = 320  # shorter side of the photographs ``main`` writes
BUNDLED = Path(__file__).resolve().parents[2] / "notebooks" / "images"


def photographs(size: int, folder: Path | None = None, limit: int = 16) -> tuple[np.ndarray, str]:
    """Up to ``limit`` images as float32 (N, size, size, 3) in [0, 1], each resized so its
    shorter side is ``size`` and centre-cropped, and where they came from."""
    if folder is not None:
        images, source = _from_folder(folder), f"photographs in {folder}"
        if not images:
            raise FileNotFoundError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
    else:
        images, source = _from_skimage(), "sample photographs of scikit-image"
    if not images and BUNDLED.is_dir():
        images, source = _from_folder(BUNDLED), f"photographs in {BUNDLED.parent.name}/{BUNDLED.name}"
    if not images:
        images, source = [generated_image(seed) for seed in range(limit)], "generated images (no photographs available)"
    cropped = [ImageOps.fit(image.convert("RGB"), (size, size), Image.BILINEAR) for image in images[:limit]]
    return np.stack([np.asarray(image, np.float32) / 255.0 for image in cropped]), f"{len(cropped)} {source}"


def _from_folder(folder: Path) -> list[Image.Image]:
    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    return [_read(path) for path in files]


def _read(path: Path) -> Image.Image:
    with Image.open(path) as image:
        image.load()
        return image


def _from_skimage() -> list[Image.Image]:
    try:
        import skimage.data
    except ImportError:
        return []
    return [Image.fromarray(_photo(getattr(skimage.data, name)())) for name in SKIMAGE_PHOTOS]


def _photo(pixels: np.ndarray) -> np.ndarray:
    return pixels[..., :3] if pixels.ndim == 3 else pixels


def generated_image(seed: int, size: tuple[int, int] = (256, 256)) -> Image.Image:
    """Smooth colour blobs with a little noise, (width, height) ``size``: not a photograph, but
    with more of one's structure than uniform noise has."""
    rng = np.random.default_rng(seed)
    width, height = size
    y, x = np.mgrid[0:height, 0:width] / max(size)
    image = np.zeros((height, width, 3))
    for _ in range(6):
        cy, cx, spread = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.4)
        image += rng.uniform(0, 200, 3) * np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / spread**2)[..., None]
    image += rng.normal(0, 8, image.shape)
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory", type=Path, help="where to write the photographs (created)")
    args = parser.parse_args(argv)
    images = _from_skimage()
    if not images:
        print("error: scikit-image is not installed here", file=sys.stderr)
        return 1
    args.directory.mkdir(parents=True, exist_ok=True)
    for name, image in zip(SKIMAGE_PHOTOS, images, strict=True):
        scale = WRITTEN_SIDE / min(image.size)  # small enough to carry, large enough for 224 px
        if scale < 1:
            image = image.resize((round(image.width * scale), round(image.height * scale)), Image.LANCZOS)
        image.save(args.directory / f"{name}.jpg", quality=90)
    print(f"wrote {len(images)} photographs to {args.directory}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
