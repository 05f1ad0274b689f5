"""How much arithmetic a TResNet image costs, and what fraction of a GPU's bfloat16 peak a
measured rate reaches.

The count stated for the targets: multiply-accumulates of the forward pass at 224x224 from
timm's profile of each model (TRESNET.md), two FLOPs each, scaled with the image area; a
training image costs three forward passes (forward, input gradients, weight gradients). For
tresnet_m: 11.5 GFLOP per image in inference, 34.5 in training. XLA's own count of the compiled
step is recorded beside it (``xla_flops``).
"""

from __future__ import annotations

GMACS_AT_224 = {"tresnet_m": 5.75, "tresnet_l": 10.9, "tresnet_xl": 15.2, "tresnet_v2_l": 8.85, "tresnet_l_v2": 8.85}
TRAINING_PASSES = 3
# Dense (no sparsity) bfloat16 tensor-core peaks in TFLOP/s from NVIDIA's data sheets, by a
# part of the name the driver reports; the first match counts (the GH200 is an H200-class part).
BF16_PEAK_TFLOPS = (
    ("H200 NVL", 835.0),
    ("H200", 989.0),
    ("H100 NVL", 835.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
)


def flops_per_image(model: str, image_size: int, mode: str) -> float | None:
    """The stated FLOPs of one image of ``model`` at ``image_size`` in ``mode`` (infer/train);
    None for a model without a stated count."""
    if model not in GMACS_AT_224:
        return None
    passes = TRAINING_PASSES if mode == "train" else 1
    return 2e9 * GMACS_AT_224[model] * (image_size / 224) ** 2 * passes


def bf16_peak_tflops(device_name: str) -> float | None:
    """The card's dense bfloat16 peak, or None for a card not in the table."""
    return next((peak for part, peak in BF16_PEAK_TFLOPS if part in device_name), None)
