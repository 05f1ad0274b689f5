"""A TResNet (tresnet_m unless told) against timm on the same device in true float32, and its reduced-precision logits
against its float32 ones, on photographs.

Weights: the parity tests' random TResNet (``tests/reference.py``: every tensor random,
BatchNorm statistics and a head that spread the logits), converted by the library. timm runs in
true float32 as well (TF32 off for cuDNN and cuBLAS).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch

from tests.reference import parity_error, random_timm_model
from tresnet_jax.model.linen import TResNet
from tresnet_jax.model.registry import resolve
from tresnet_jax.weights.conversion import convert_state_dict

# check -> (compute dtype, allow_tf32): the model's own numerics (``layers.Numerics.of``).
CHECKS = {
    "fp32": (jnp.float32, False),
    "fp32_tf32": (jnp.float32, True),
    "bf16": (jnp.bfloat16, False),
    "fp16": (jnp.float16, False),
}
MODEL = "tresnet_m"


def check_numerics(
    images: np.ndarray, checks: Sequence[str], device: torch.device, model_name: str = MODEL
) -> Iterator[tuple[str, dict[str, Any]]]:
    """(check, figures) for each of ``checks`` (keys of CHECKS; float32 first), one at a time:
    the error against timm's float32 logits, and for reduced precision the agreement with
    float32."""
    reference = random_timm_model(model_name, seed=0)
    spec = resolve(model_name)
    state_dict = {k: v.numpy() for k, v in reference.state_dict().items()}
    variables = jax.device_put(convert_state_dict(state_dict, spec).variables)
    with true_float32_torch():
        expected = timm_logits(reference, images, device)
    model = TResNet(spec.arch, expected.shape[-1])
    float32 = None
    for name in checks:
        dtype, allow_tf32 = CHECKS[name]
        checked = model.clone(dtype=dtype, allow_tf32=allow_tf32)
        logits = np.asarray(jax.jit(checked.apply)(variables, images), np.float64)
        precision = checked.numerics.precision
        row = {
            "dtype": jnp.dtype(dtype).name,
            "matmul_precision": precision.name.lower() if precision is not None else "JAX's default",
            "vs_timm_float32": parity_error(logits, expected),
            "max_abs_timm_logit": float(np.abs(expected).max()),
        }
        if name == "fp32":
            float32 = logits
        elif float32 is not None:
            row |= agreement(logits, float32)
        yield name, row


def agreement(logits: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """Relative L2 error of the logits, and the fraction of images whose top-1 class, and whose
    set of top-5 classes, is the reference's."""
    top5 = lambda x: np.sort(np.argsort(-x, axis=-1)[:, :5], axis=-1)  # noqa: E731
    return {
        "relative_l2_vs_fp32": float(np.linalg.norm(logits - reference) / np.linalg.norm(reference)),
        "top1_agreement": float(np.mean(logits.argmax(-1) == reference.argmax(-1))),
        "top5_agreement": float(np.mean(np.all(top5(logits) == top5(reference), axis=-1))),
    }


def timm_logits(model: torch.nn.Module, images: np.ndarray, device: torch.device) -> np.ndarray:
    x = torch.from_numpy(images).permute(0, 3, 1, 2).to(device)
    with torch.no_grad():
        out = model.to(device)(x).double().cpu().numpy()
    model.cpu()
    return out


@contextlib.contextmanager
def true_float32_torch() -> Iterator[None]:
    """PyTorch's float32 convolutions and matrix products without TF32 (cuDNN allows TF32 for
    convolutions by default)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
