"""Multi-label evaluation metrics: average precision per class and its mean over the classes
(mAP, in percent, as ASL reports it).

NumPy only: this module imports nothing of the package, nor JAX.
"""

from __future__ import annotations

import numpy as np

# Columns sorted at once: bounds the temporaries to about this many elements (a few tens of MB).
_CHUNK_ELEMENTS = 1 << 22


def _validate(scores: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores)
    targets = np.asarray(targets)
    if scores.ndim != 2 or targets.ndim != 2:
        raise ValueError(
            f"scores and targets must be 2-D (samples, classes); got {scores.ndim}-D and {targets.ndim}-D arrays"
        )
    if scores.shape != targets.shape:
        raise ValueError(f"scores and targets must have the same shape; got {scores.shape} and {targets.shape}")
    if scores.dtype.kind not in "biuf":
        raise ValueError(f"scores must be real numbers; got dtype {scores.dtype}")
    if targets.dtype.kind not in "biuf":
        raise ValueError(f"targets must be 0/1 numbers; got dtype {targets.dtype}")
    scores = scores.astype(np.float64)
    if not np.isfinite(scores).all():
        bad = int(scores.size - np.isfinite(scores).sum())
        raise ValueError(f"scores must be finite; {bad} of {scores.size} are NaN or inf")
    binary = (targets == 0) | (targets == 1)
    if not binary.all():
        bad = targets[~binary]
        raise ValueError(
            f"targets must be binary (0 or 1); found {bad.flat[0].item()!r} ({bad.size} of {targets.size})"
        )
    return scores, targets.astype(np.float64)


def average_precision_per_class(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Average precision of each class (column), as scikit-learn's ``average_precision_score``
    defines it; NaN for a class without a positive target.

    ``AP = sum_n (R_n - R_{n-1}) * P_n`` over the distinct scores taken as thresholds, from the
    highest down: tied samples enter together. Equivalently, the mean over the positives of the
    precision at the lowest-ranked sample tied with each of them. Any score scale (logits,
    probabilities) gives the same result, the order being all that counts.

    Args:
        scores: (samples, classes), finite.
        targets: (samples, classes), 0 or 1 (bool, int or float).

    Returns:
        float64 array of shape (classes,), each value in [0, 1] or NaN.
    """
    scores, targets = _validate(scores, targets)
    num_samples, num_classes = scores.shape
    result = np.full(num_classes, np.nan)
    if num_samples == 0:
        return result
    rank = np.arange(num_samples)[:, None]
    step = max(1, _CHUNK_ELEMENTS // num_samples)
    for start in range(0, num_classes, step):
        chunk = slice(start, start + step)
        order = np.argsort(-scores[:, chunk], axis=0, kind="stable")
        sorted_scores = np.take_along_axis(scores[:, chunk], order, axis=0)
        sorted_targets = np.take_along_axis(targets[:, chunk], order, axis=0)
        true_positives = np.cumsum(sorted_targets, axis=0)
        # The last row of each run of tied scores closes a threshold; every row of the run is
        # evaluated there.
        closes = np.ones_like(sorted_scores, dtype=bool)
        closes[:-1] = sorted_scores[:-1] != sorted_scores[1:]
        last_of_run = np.minimum.accumulate(np.where(closes, rank, num_samples)[::-1], axis=0)[::-1]
        precision = np.take_along_axis(true_positives, last_of_run, axis=0) / (last_of_run + 1)
        positives = true_positives[-1]
        with np.errstate(invalid="ignore", divide="ignore"):
            average = (sorted_targets * precision).sum(axis=0) / positives
        result[chunk] = np.where(positives > 0, average, np.nan)
    return result


def mean_average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    """mAP in percent: the mean of ``average_precision_per_class`` over the classes with at
    least one positive target (the others are left out, not counted as 0).

    Raises:
        ValueError: on invalid inputs, or when no class has a positive target.
    """
    per_class = average_precision_per_class(scores, targets)
    present = ~np.isnan(per_class)
    if not present.any():
        raise ValueError("mean_average_precision: no class has a positive target")
    return float(per_class[present].mean() * 100.0)
