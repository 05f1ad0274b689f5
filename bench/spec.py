"""What one measurement is: model, mode, precision, batch and image size, and its validation."""

from __future__ import annotations

import dataclasses

import numpy as np

from tresnet_jax.errors import InputError
from tresnet_jax.model.registry import resolve
from tresnet_jax.preprocessing import check_image_size
from tresnet_jax.runtime.precision import PRECISIONS as COMPUTE_PRECISIONS

MODES = ("infer", "train")
PRECISIONS = tuple(COMPUTE_PRECISIONS)
# timm has no separate official TResNet-L-V2: the same network is its tresnet_v2_l.
TIMM_NAMES = {"tresnet_l_v2": "tresnet_v2_l"}


@dataclasses.dataclass(frozen=True)
class BenchSpec:
    """One configuration to time, identical for every framework."""

    model: str = "tresnet_m"
    mode: str = "infer"
    precision: str = "fp32"
    batch_size: int = 8
    image_size: int = 224
    num_classes: int = 1000
    learning_rate: float = 0.01  # SGD with momentum 0.9 in training mode

    @property
    def timm_model(self) -> str:
        return TIMM_NAMES.get(self.model, self.model)

    def with_batch(self, batch_size: int) -> BenchSpec:
        return dataclasses.replace(self, batch_size=batch_size)


def validate(spec: BenchSpec) -> BenchSpec:
    """Raise InputError (one line) for a configuration no framework can run."""
    resolve(spec.model)  # an unknown name is refused with the closest known ones
    if spec.mode not in MODES:
        raise InputError(f"unknown mode {spec.mode!r}; known: {', '.join(MODES)}")
    if spec.precision not in PRECISIONS:
        raise InputError(f"unknown precision {spec.precision!r}; known: {', '.join(PRECISIONS)}")
    if spec.batch_size < 1:
        raise InputError(f"batch size must be >= 1, got {spec.batch_size}")
    check_image_size(spec.image_size)
    if spec.num_classes < 1:
        raise InputError(f"number of classes must be >= 1, got {spec.num_classes}")
    return spec


def synthetic_batch(spec: BenchSpec, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, H, W, 3) uniform in [0, 1] (TResNet's input range) and integer labels."""
    rng = np.random.default_rng(seed)
    shape = (spec.batch_size, spec.image_size, spec.image_size, 3)
    images = rng.uniform(size=shape).astype(np.float32)
    labels = rng.integers(0, spec.num_classes, spec.batch_size).astype(np.int32)
    return images, labels
