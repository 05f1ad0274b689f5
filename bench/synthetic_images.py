"""ImageNet-like JPEG folders for the input-pipeline benchmarks, with nothing but NumPy and PIL
(so that a process writing them starts in a fraction of a second, and one per core is cheap).

    python -m bench.synthetic_images runs/jpegs --count 4096 --workers 16 --progressive 32 --png 8

The images are crops of the notebook's photographs (generated images where they are missing) at
the sizes of ``SYNTHETIC_SIZES`` (ImageNet's training set: the long side mostly 500 px, a tail of
larger photographs), flipped, tinted and grained, quality 90, in 8 class folders
(``DIR/class<k>/<i>.jpg``). A few can be progressive JPEGs or PNG bytes under a ``.jpg`` name,
as real collections hold (ImageNet's training set has both): the cases a GPU decoder hands back
to the host. ``--copies C`` adds C - 1 hard links of every file beside it
(``<i>.copy<c>.jpg``): a larger folder at no cost in time or disk, for runs that must last.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
from PIL import Image, ImageOps

from bench.gpu.photos import BUNDLED, generated_image

# (width, height, weight): roughly ImageNet's training images, whose long side is mostly 500 px,
# with a tail of larger photographs (what decoding at reduced scale helps with).
SYNTHETIC_SIZES = (
    (500, 375, 30), (500, 333, 20), (375, 500, 8), (333, 500, 5), (500, 500, 5), (500, 400, 5),
    (400, 300, 5), (640, 480, 7), (800, 600, 5), (1024, 768, 5), (1600, 1200, 3), (2048, 1536, 2),
)  # fmt: skip
GRAIN = 16.0  # luma noise (std) on the upscaled photographs: about 0.5 byte per pixel at quality 90
CLASSES = 8
CHUNK = 64  # images drawn from one random stream: the folder depends on count and seed, not on workers


def write_synthetic(
    folder: Path, count: int, seed: int = 0, workers: int = 1, progressive: int = 0, png: int = 0
) -> list[Path]:
    """``count`` ImageNet-like JPEGs in ``folder``/<class>/ (module docstring), ``progressive`` of
    them progressive and ``png`` of them PNG bytes named ``.jpg``, spread evenly; written by
    ``workers`` processes (spawned) when more than one. The same files whatever ``workers``."""
    special: dict[int, dict] = {i: {"progressive": True} for i in _spread(count, progressive, 0.5)}
    for i in _spread(count, png, 0.25):
        while i in special and len(special) < count:  # the next image that is not special yet
            i = (i + 1) % count
        special[i] = {"format": "PNG"}
    chunks = [(folder, first, min(CHUNK, count - first), seed, special) for first in range(0, count, CHUNK)]
    if workers <= 1 or len(chunks) == 1:
        return [path for chunk in chunks for path in _write_chunk(*chunk)]
    context = multiprocessing.get_context("spawn")  # the caller may hold threads (JAX): no fork
    with concurrent.futures.ProcessPoolExecutor(min(workers, len(chunks)), mp_context=context) as pool:
        return [path for paths in pool.map(_write_chunk, *zip(*chunks, strict=True)) for path in paths]


def link_copies(paths: Sequence[Path], copies: int) -> list[Path]:
    """``copies - 1`` hard links of every file beside it (a copy where links are refused)."""
    made = []
    for path in paths:
        for c in range(1, copies):
            target = path.with_name(f"{path.stem}.copy{c}{path.suffix}")
            try:
                os.link(path, target)
            except OSError:
                target.write_bytes(path.read_bytes())
            made.append(target)
    return made


def _spread(count: int, n: int, offset: float) -> list[int]:
    """``n`` indices spread evenly over ``range(count)``."""
    return sorted({min(count - 1, int((k + offset) * count / n)) for k in range(n)}) if count and n else []


def _write_chunk(folder: Path, first: int, n: int, seed: int, special: dict[int, dict]) -> list[Path]:
    # The first chunk's stream is the one a single ``default_rng(seed)`` gave before chunks existed.
    rng = np.random.default_rng(seed if first == 0 else (seed, first))
    bundled = sorted(BUNDLED.glob("*.jpg")) if BUNDLED.is_dir() else []
    sources = [Image.open(path).convert("RGB") for path in bundled]
    sources = sources or [generated_image(i, (384, 288)) for i in range(4)]
    sizes = np.array([s[:2] for s in SYNTHETIC_SIZES])
    weights = np.array([s[2] for s in SYNTHETIC_SIZES], np.float64)
    paths = []
    for i in range(first, first + n):
        width, height = sizes[rng.choice(len(sizes), p=weights / weights.sum())]
        source = sources[rng.integers(len(sources))]
        fraction = rng.uniform(0.6, 1.0)
        box_w, box_h = int(source.width * fraction), int(source.height * fraction)
        left, top = rng.integers(0, source.width - box_w + 1), rng.integers(0, source.height - box_h + 1)
        image = ImageOps.fit(
            source.crop((left, top, left + box_w, top + box_h)), (int(width), int(height)), Image.Resampling.BICUBIC
        )
        if rng.random() < 0.5:
            image = ImageOps.mirror(image)
        pixels = np.asarray(image, np.float32) * rng.uniform(0.8, 1.2, 3)
        pixels += rng.normal(0.0, GRAIN, (int(height), int(width), 1))
        path = folder / f"class{i % CLASSES}" / f"{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        options = special.get(i, {"quality": 90})
        if options.get("progressive"):
            options = {"quality": 90, **options}
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, **{"format": "JPEG", **options})
        paths.append(path)
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="where to write (DIR/class<k>/*.jpg)")
    parser.add_argument("--count", type=int, required=True, help="images to draw")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes (default: the cores)")
    parser.add_argument("--progressive", type=int, default=0, help="how many of them progressive JPEGs")
    parser.add_argument("--png", type=int, default=0, help="how many of them PNG bytes named .jpg")
    parser.add_argument("--copies", type=int, default=1, help="every file and C - 1 hard links of it")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    paths = write_synthetic(args.folder, args.count, args.seed, args.workers, args.progressive, args.png)
    written = time.perf_counter() - start
    links = link_copies(paths, args.copies)
    sizes = np.array([Image.open(path).size for path in paths], np.float64)
    summary = {
        "images": len(paths), "progressive": args.progressive, "png_named_jpg": args.png, "links": len(links),
        "writing_s": written, "workers": args.workers, "mean_size": sizes.mean(0).round(1).tolist(),
        "mib": sum(p.stat().st_size for p in paths) / 2**20, "folder": str(args.folder),
    }  # fmt: skip
    print(json.dumps(summary))  # one line: what bench/gpu/jpeg_pipeline.py reads
    return 0


if __name__ == "__main__":
    sys.exit(main())
