"""PIL's resampling (``Image.resize(..., box=...)``, ``ImagingResample``) as per-axis taps and
weights, so that a resize done elsewhere (as matrix products on the GPU, ``gpu_decode``) gives
PIL's pixels: the same filter, taps, clipping at the image's edges and weights quantised to PIL's
22 bits; rounding after each pass is the caller's part.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

PRECISION_BITS = 22  # PIL's fixed-point resampling weights for 8-bit images


def _triangle(x: np.ndarray) -> np.ndarray:
    return np.maximum(1.0 - np.abs(x), 0.0)


def _cubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


FILTERS: dict[str, tuple[float, Callable[[np.ndarray], np.ndarray]]] = {
    "bilinear": (1.0, _triangle),
    "bicubic": (2.0, _cubic),
}


def resample_weights(
    starts: np.ndarray, ends: np.ndarray, in_sizes: np.ndarray, out: int, interpolation: str = "bilinear"
) -> tuple[np.ndarray, np.ndarray]:
    """PIL's resampling of [start, end) of an axis of ``in_size`` pixels onto ``out`` pixels, for
    n images at once (``ImagingResample``'s ``precompute_coeffs``): the first input pixel of each
    output pixel, int64 (n, out), and its taps' weights, float64 (n, out, taps), zero past the
    last tap, quantised to PIL's fixed point. Taps outside the box but inside the image count, as
    in PIL; ``nearest`` is PIL's affine nearest (one tap)."""
    starts, ends, in_sizes = (np.asarray(v, np.float64)[:, None] for v in (starts, ends, in_sizes))
    scale = (ends - starts) / out
    centers = starts + (np.arange(out) + 0.5) * scale
    if interpolation == "nearest":
        first = np.clip(np.floor(centers), 0, in_sizes - 1).astype(np.int64)
        return first, np.ones((*first.shape, 1))
    support, kernel = FILTERS[interpolation]
    filter_scale = np.maximum(scale, 1.0)
    reach = support * filter_scale
    first = np.maximum(np.trunc(centers - reach + 0.5), 0).astype(np.int64)
    last = np.minimum(np.trunc(centers + reach + 0.5), in_sizes).astype(np.int64)
    taps = np.arange(int((last - first).max()))
    weights = kernel((first[..., None] + taps - centers[..., None] + 0.5) / filter_scale[..., None])
    weights = np.where(taps < (last - first)[..., None], weights, 0.0)
    total = weights.sum(-1, keepdims=True)
    weights = np.divide(weights, total, out=np.zeros_like(weights), where=total != 0)
    scaled = weights * (1 << PRECISION_BITS)
    return first, np.trunc(scaled + np.where(scaled < 0, -0.5, 0.5)) / (1 << PRECISION_BITS)
